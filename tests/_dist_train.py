"""Launched by tests/test_distributed_harness.py, under torchrun or alone: a few logged steps of the
tiny preset, optionally interrupted (as by Ctrl-C) after a given step, which leaves a checkpoint."""

import os
import signal
import sys

from fourbit.harness.parallel import finish
from fourbit.harness.train import train, train_config


def main(out: str, recipe: str, parallel: str, steps: int, stop_after: int, resume: bool) -> None:
    preset, batch = "tiny", 4
    cfg = train_config(
        preset, recipe=recipe, steps=steps, batch_size=batch, log_every=1, eval_every=1, eval_tokens=1024,
        ckpt_every=100, warmup=2, parallel=parallel,
    )

    def ctrl_c(step: int) -> None:
        if step == stop_after:
            os.kill(os.getpid(), signal.SIGINT)  # the loop saves a checkpoint of this step and stops

    try:
        train(cfg, out, resume=resume, progress=False, callback=ctrl_c if stop_after else None)
    except KeyboardInterrupt:
        pass
    finish()  # as `fourbit train` does: leave the process group (exiting inside it can abort gloo)


if __name__ == "__main__":
    out, recipe, parallel, steps, stop_after, resume = sys.argv[1:7]
    main(out, recipe, parallel, int(steps), int(stop_after), resume == "resume")
