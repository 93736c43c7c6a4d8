"""ALUM (or FGSM, FGM, PGD) fine-tuning inside HF's `Trainer`: a subclass whose `compute_loss`
is `pipeline.methods.adversarial.compute_losses`, the same objective, defaults and dropout replay as
`alum finetune`, for your own Trainer code. The methods that need more than a loss from
`compute_loss` (several backwards or a gradient read after Trainer's backward: amortized
ALUM, FreeLB, YOPO, FreeAT; SMART's teacher and ASA's adversaries updated after each
optimizer step) are refused
here: `alum finetune` runs them, and so can any loop of yours with
`pipeline.methods.adversarial.run_objective`.

    from pipeline.methods.adversarial import AdversarialConfig
    from pipeline.tasks.hf_trainer import AdversarialTrainer

    model = AutoModelForSequenceClassification.from_pretrained("hf/base", num_labels=2)
    trainer = AdversarialTrainer(model=model, args=TrainingArguments("out"), train_dataset=train,
                                 data_collator=DataCollatorWithPadding(tokenizer),
                                 adversarial=AdversarialConfig(method="alum", alpha=1.0))
    trainer.train()

The model is an HF sequence classifier of BERT or RoBERTa kind (delta goes on its base
model's embeddings, `adversarial.perturb_at`); batches hold ``labels`` and ``attention_mask``.
The step `adversarial.start_step` counts is Trainer's ``global_step``. Evaluation scores
the clean cross-entropy. Training logs add ``loss_adv``, this process's mean adversarial
term since the last log.

This module imports no DeepSpeed; Trainer itself (through accelerate) imports it whenever it
is installed, and runs without it where it is not (tested). Tested in one process on CPU
(tests/unit/tasks/test_hf_trainer.py). Under Trainer's DeepSpeed or DDP integration the wrapped model
would run the clean and adversarial passes and the core model the ascent, as `alum finetune`
does with DeepSpeed; that combination is not tested here.
"""

from __future__ import annotations

import torch
from transformers import Trainer

from pipeline.methods.adversarial import AdversarialConfig, compute_losses
from pipeline.methods.registry import method_of
from pipeline.model.masked_lm import Perturbation

CLEAN = AdversarialConfig()  # method "none": the clean cross-entropy alone


class AdversarialTrainer(Trainer):
    """`Trainer` with the loss of `compute_losses` for the ``adversarial`` config."""

    # compute_losses returns a per-batch mean, which Trainer must divide by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, *args, adversarial: AdversarialConfig, **kwargs):
        if kwargs.get("model_init") is not None:
            raise ValueError(
                "AdversarialTrainer needs model=, not model_init (which replaces the model the perturbation hooks into)"
            )
        method = method_of(adversarial)
        if method.driven or method.keeps_state:  # a backward between losses, or state updated after each step
            raise ValueError(
                f"AdversarialTrainer: adversarial.method={adversarial.method} needs more than Trainer's one backward "
                "per batch and optimizer; use `alum finetune`, "
                "or pipeline.methods.adversarial.run_objective in your own loop"
            )
        super().__init__(*args, **kwargs)
        self.adversarial = adversarial
        # On Trainer's core model (self.model), whatever wrapper training later runs it in.
        self.perturbation = Perturbation(self.model.base_model, adversarial.perturb_at)
        self._adv_sum, self._adv_count = torch.zeros(()), 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The method's loss in training, the clean one in evaluation (no gradients there for an
        ascent); ``num_items_in_batch`` is not used, the loss is a mean over the batch."""
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        clean = []

        def forward(delta):
            output, embedded = self.perturbation.run(delta, lambda: model(**inputs))
            clean.append(output)
            return output.logits, embedded

        def ascent_forward(delta):  # the core model: an input-only gradient must not reach DDP's or ZeRO's hooks
            return self.perturbation.run(delta, lambda: self.model(**inputs))[0].logits

        config = self.adversarial if model.training else CLEAN
        losses = compute_losses(
            forward,
            ascent_forward,
            labels,
            config=config,
            step=self.state.global_step,
            real_tokens=inputs.get("attention_mask"),
        )
        if model.training:
            self._adv_sum = self._adv_sum.to(losses.loss_adv.device) + losses.loss_adv.detach()
            self._adv_count += 1
        return (losses.loss, clean[0]) if return_outputs else losses.loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Adds ``loss_adv`` to a training log (read back here, once per log, not per step)."""
        if "loss" in logs and self._adv_count:
            logs["loss_adv"] = self._adv_sum.item() / self._adv_count
            self._adv_sum, self._adv_count = torch.zeros(()), 0
        super().log(logs, *args, **kwargs)
