"""`python -m pipeline.finetune` (`alum finetune`): the entry point kept at its documented name;
the code is pipeline.tasks.finetune."""

from pipeline.tasks.finetune import main

if __name__ == "__main__":
    from pipeline.train.distributed import exit_process

    exit_process(main())
