"""Pretraining: windows of token streams, cross-entropy on every next token."""

from trainer_accel.config import PhaseKeys
from trainer_accel.paths import STREAM
from trainer_accel.phases.phase import Phase

PRETRAIN = Phase(
    name="pretrain",
    title="pretrain",
    stage_id=0,
    keys=PhaseKeys(
        sources_key="sources",
        sources_kind=STREAM,
        example="wiki",
        default_sources={"wiki": 0.784, "roam": 0.196, "primer": 0.020},
        no_packing="packing is for SFT; a pretrain row is already a full window of the stream (set it in the sft "
        "config)",
    ),
    doc="token streams, cross-entropy on every next token",
)
