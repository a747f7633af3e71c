"""CTC losses, alignment targets and forced alignment; time-major like ``torch.nn.functional.ctc_loss``.

Functions take ``F.ctc_loss``'s arguments; every loss module's ``forward`` does too, so swapping one
loss for another (``python train.py loss=focal_ctc``) changes nothing else. Every loss module derives from
:class:`CTCLossBase` (``blank``, ``reduction``, ``zero_infinity``); shape symbols are those of
:mod:`losses.targets` (``N = 2S + 1`` states).
"""

from losses.alignment import TokenSpan, ctc_alignment_targets, forced_align, path_to_spans
from losses.base import CTCLossBase
from losses.builtin import CTCLoss
from losses.ctc import PythonCTCLoss, ctc_loss
from losses.cross_entropy import AlignmentTargetLoss, ReweightedCTCLoss, SmoothedCTCLoss
from losses.entropy import MaxEntropyCTCLoss, ctc_path_entropy
from losses.focal import FocalCTCLoss
from losses.targets import required_frames

__all__ = [
    "AlignmentTargetLoss",
    "CTCLoss",
    "CTCLossBase",
    "FocalCTCLoss",
    "MaxEntropyCTCLoss",
    "PythonCTCLoss",
    "ReweightedCTCLoss",
    "SmoothedCTCLoss",
    "TokenSpan",
    "ctc_alignment_targets",
    "ctc_loss",
    "ctc_path_entropy",
    "forced_align",
    "path_to_spans",
    "required_frames",
]
