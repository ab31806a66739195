"""Run the recipes CLI with DeepSpeed allowed on CPU (gloo), for tests on machines without GPUs.

    python -m tests.deepspeed_cpu train tiny trainer.strategy=deepspeed_stage_2 trainer.accelerator=cpu ...

Lightning's DeepSpeedStrategy refuses any accelerator but CUDA (`setup_environment`), and it hands
DeepSpeed the root device's index, which is None for a plain CPU device (DeepSpeed then fails comparing
None >= 0; Lightning also checks that device indices equal the local ranks). DeepSpeed itself runs on CPU
(its CPU accelerator, gloo collectives). The adapter skips the CUDA check and numbers the CPU devices by
local rank (`cpu:<rank>`, which torch treats as the CPU). Lightning's DDP launcher re-runs this same
module for ranks > 0, so they get the adapter too.
"""
from __future__ import annotations

import sys

import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

from recipes.engine.strategies import deepspeed_strategy, register_strategy


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    def setup_environment(self) -> None:
        self.parallel_devices = [torch.device("cpu", i) for i in range(len(self.parallel_devices))]
        DDPStrategy.setup_environment(self)  # the parent's own set-up, minus the CUDA-only check


def install() -> None:
    """Make trainer.strategy=deepspeed_stage_{2,3} build the CPU adapter in this process."""
    for stage in (2, 3):
        register_strategy(f"deepspeed_stage_{stage}",
                          lambda cfg, stage=stage: deepspeed_strategy(cfg, stage, CPUDeepSpeedStrategy))


if __name__ == "__main__":
    install()
    from recipes.__main__ import main

    sys.exit(main())
