"""One small MEDIC, BCU or finetune run with ``checkpoint=``, for tests/defenses/test_checkpoint.py
to interrupt.

    python tests/support/checkpoint_worker.py medic|bcu|finetune DATA.pt OUT.pt [--checkpoint DIR]
        [--resume] [--kill-step N | --term-step N | --kill-write N] [--ddp]

Cleans an untrained digits CNN teacher (:func:`clean`) on the 96 images of DATA.pt in 3
shuffled batches of 32 for 3 epochs on one thread and saves the student's state_dict to
OUT.pt (finetune: trains a copy of it on the labelled images). The interruptions are counted
in the run's own terms: ``--kill-step N`` sends SIGKILL to this process just before global
step N (0-based, counted across epochs from the resumed position) would run, ``--term-step N``
sends SIGTERM there instead (the run then finishes that step, writes a checkpoint and exits
with bdfast.defenses.checkpoint.EXIT_INTERRUPTED), and ``--kill-write N`` sends SIGKILL halfway
through writing this process's N-th checkpoint file. With ``--ddp`` it runs under torchrun (gloo):
each rank trains on its half of the batches and rank 1 kills itself at ``--kill-step`` on the first
attempt only.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings

import torch

import bdfast
from bdfast import defenses
from bdfast.defenses import bcu, checkpoint, medic, registry
from bdfast.defenses.checkpoint import EXIT_INTERRUPTED, Interrupted
from bdfast.loaders import tensor_loader
from bdfast.defenses.distill import fit
from bdfast.lab.models import digits_cnn

EPOCHS, BATCH, IMAGES = 3, 32, 96
STEPS_PER_EPOCH = IMAGES // BATCH


def interrupt_at_step(args: argparse.Namespace) -> None:
    """Wrap the defenses' fit so that the chosen signal arrives before global step N."""
    step, sig = ((args.kill_step, signal.SIGKILL) if args.kill_step is not None
                 else (args.term_step, signal.SIGTERM))
    if step is None:
        return
    if args.ddp and (int(os.environ.get("RANK", 0)) != 1
                     or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0):
        return

    def counted_fit(student, loader, step_fn, optimizer, **options):
        position = [0]
        saver = options.get("checkpoint")
        if saver is not None:
            load = saver.load

            def noting_load():
                state = load()
                if state is not None:
                    position[0] = state["epoch"] * len(loader) + state["step"]
                return state
            saver.load = noting_load

        def counted_step(net, x, y, epoch):
            if position[0] == step:
                os.kill(os.getpid(), sig)
            position[0] += 1
            return step_fn(net, x, y, epoch)
        return fit(student, loader, counted_step, optimizer, **options)

    medic.fit = bcu.fit = registry.fit = counted_fit


def kill_in_write(number: int) -> None:
    """SIGKILL halfway through the ``number``-th checkpoint file this process writes."""
    real_save = torch.save
    writes = [0]

    def save(payload, f, *a, **k):
        real_save(payload, f, *a, **k)
        if getattr(f, "name", "").endswith(".tmp"):
            writes[0] += 1
            if writes[0] == number:
                f.flush()
                f.truncate(f.tell() // 2)
                os.fsync(f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
    checkpoint.torch.save = save


def init_process_group() -> None:
    """A gloo group under torchrun, its store keys set apart per restart: with torch 2.14 the
    restarted workers of ``init_process_group("gloo")`` read the dead attempt's addresses from
    the agent's store and fail to connect (docs/long-runs.md)."""
    dist = torch.distributed
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=not agent and rank == 0)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group("gloo", store=dist.PrefixStore(f"attempt-{attempt}", store),
                            rank=rank, world_size=world)


def clean(defense: str, data: str, *, rank: int = 0, world: int = 1, teacher_seed: int = 0,
          **options) -> torch.nn.Module:
    """The run: an untrained digits CNN teacher (``teacher_seed``) cleaned by ``defense`` on
    rank ``rank``'s share of the images saved in ``data`` (``(x [96, 1, 16, 16], y [96])``)."""
    torch.manual_seed(teacher_seed)
    teacher = digits_cnn().eval()
    x, y = (t[rank::world] for t in torch.load(data, weights_only=True))
    if defense == "finetune":  # the baseline takes tensors and shuffles them itself
        return defenses.run("finetune", teacher, clean=(x, y), batch_size=BATCH // world,
                            seed=0, epochs=EPOCHS, progress=False, **options).model
    loader = tensor_loader(x, y, batch_size=BATCH // world, shuffle=True, seed=0)
    options = dict(epochs=EPOCHS, seed=0, progress=False, amp=False, **options)
    if defense == "medic":
        return bdfast.medic_clone(teacher, loader, **options)
    # The augmentation's generator is part of the state too.
    return bdfast.bcu_cleanse(teacher, loader, augment="crop", **options)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("defense", choices=("medic", "bcu", "finetune"))
    parser.add_argument("data")
    parser.add_argument("out")
    parser.add_argument("--checkpoint")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--kill-step", type=int)
    parser.add_argument("--term-step", type=int)
    parser.add_argument("--kill-write", type=int)
    parser.add_argument("--ddp", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the run must not depend on the machine's cores
    # The student of an untrained teacher matches it on few images, so the collapse guard's
    # warning is expected here; the tests read this process's stderr line by line.
    warnings.filterwarnings("ignore", message=".*training collapsed", category=RuntimeWarning)
    interrupt_at_step(args)
    if args.kill_write is not None:
        kill_in_write(args.kill_write)
    rank = world = None
    if args.ddp:
        init_process_group()
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    try:
        model = clean(args.defense, args.data, rank=rank or 0, world=world or 1,
                      checkpoint=args.checkpoint, resume=args.resume)
    except Interrupted as error:
        print(error, file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if args.ddp:
            torch.distributed.destroy_process_group()
    if not rank:
        torch.save(model.state_dict(), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
