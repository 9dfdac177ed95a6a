"""Frozen-backbone evaluation probes: action classification, video depth, box tracking.

    ivfast-probe classify|depth|track --config FILE [key=value ...]

Modules: :mod:`.config` (typed config), :mod:`.features` (frozen encoder, feature cache),
:mod:`.loop` (the shared head-training loop), :mod:`.classify`, :mod:`.depth`, :mod:`.track`,
:mod:`.cli`.
"""
