"""Video data: generated clips, list-file readers, frame sampling and augmentation."""
