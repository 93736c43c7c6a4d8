"""`python -m pipeline.pretrain`, `deepspeed --module pipeline.pretrain`, `torchrun -m pipeline.pretrain`:
the entry point kept at its documented name; the code is pipeline.train.pretrain."""

from pipeline.train.pretrain import main

if __name__ == "__main__":
    from pipeline.train.distributed import exit_process

    exit_process(main())
