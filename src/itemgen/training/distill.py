"""Knowledge distillation from a trained teacher (config ``distill``).

At every label the student minimises (1 - w) * CE(label) + w * T^2 * KL(p_teacher || p_student),
with both distributions over the whole catalog at temperature T (Hinton et al., 2015). ItemLM
starts from a trained SASRec's item vectors (items.init=sasrec); the same SASRec as teacher also
hands over its full distribution over next items, a softer target than the one-hot label on
datasets with a dozen interactions per item. The teacher is frozen and only used in training:
the student checkpoint is scored and served alone.

Several teachers (``distill.teacher`` = checkpoints separated by commas) are matched as one: their
ensemble, the mean of their log-probabilities at each label. An ensemble of seeds ranks above any
one of them (docs/quality_notes.md section 4), and the student keeps one model's cost at inference.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from itemgen.core.config import Config, DistillConfig
from itemgen.data.dataset import SequenceDataset
from itemgen.models.checkpoint import CheckpointError, load_checkpoint
from itemgen.models.recommender import Recommender


class Distillation:
    """Called by a student's loss with its summed cross-entropy, its item logits at the labels
    (N, I) and the teacher's scores there (N, I) -> the summed distillation objective.
    Not an nn.Module: it holds no weights, so checkpoints are the same with or without it."""

    def __init__(self, cfg: DistillConfig):
        self.weight, self.t = cfg.weight, cfg.temperature

    def __call__(self, ce: torch.Tensor, logits: torch.Tensor, teacher_scores: torch.Tensor) -> torch.Tensor:
        if teacher_scores.shape != logits.shape:
            raise ValueError(f"distillation: the teacher scored {tuple(teacher_scores.shape)} (labels, items), "
                             f"the student {tuple(logits.shape)}: they must supervise the same labels")
        log_p = F.log_softmax(logits.float() / self.t, dim=1)  # (N, I) student
        log_q = F.log_softmax(teacher_scores.float() / self.t, dim=1)  # (N, I) teacher
        kl = (log_q.exp() * (log_q - log_p)).sum()  # summed over labels, like the CE
        return (1.0 - self.weight) * ce + self.weight * self.t ** 2 * kl


class Teacher:
    """A frozen checkpoint that scores every label of the student's training sequences."""

    def __init__(self, path: str, ds: SequenceDataset, device: torch.device | str = "cpu"):
        try:
            self.model, self.cfg, items = load_checkpoint(path, device=str(device))
        except (CheckpointError, OSError) as e:
            raise CheckpointError(f"distill.teacher={path}: {e}") from None
        if list(items.ids) != list(ds.items.ids):
            raise CheckpointError(f"distill.teacher={path} was trained on another catalog ({len(items)} items) "
                                  f"than data.path ({ds.n_items} items)")
        self.model.eval().requires_grad_(False)
        self.path = path

    @torch.inference_mode()
    def scores(self, seqs: list[np.ndarray], rng: np.random.Generator) -> torch.Tensor:
        """-> (N, I) the teacher's item scores at every label of seqs, in label order."""
        m = self.model
        return m.label_scores(m.to_device(m.train_batch(seqs, rng))).float()


class Ensemble:
    """Teachers matched as one: at each label the mean of their log-probabilities (a product of
    experts, renormalised by Distillation's softmax), the same interface as one Teacher."""

    def __init__(self, teachers: list[Teacher]):
        self.teachers = teachers

    def scores(self, seqs: list[np.ndarray], rng: np.random.Generator) -> torch.Tensor:
        """-> (N, I) the mean over teachers of log softmax of their scores at every label of seqs."""
        return torch.stack([torch.log_softmax(t.scores(seqs, rng), dim=1) for t in self.teachers]).mean(0)


def teacher_paths(teacher: str) -> list[str]:
    """distill.teacher -> its checkpoint directories (one, or several separated by commas)."""
    return [p.strip() for p in teacher.split(",")]


def attach_distillation(model: Recommender, cfg: Config, ds: SequenceDataset,
                        seqs: list[np.ndarray]) -> Teacher | Ensemble | None:
    """Give ``model`` the distillation term of ``cfg.distill`` and return its teacher, or the
    ensemble of its teachers (None when distill.teacher is unset). Refuses students and teachers
    that cannot pair their labels, naming the teacher."""
    d = cfg.distill
    model.distillation = None
    if not d.teacher:
        return None
    if not model.distillable:
        raise ValueError(f"distill.teacher: a {model.name} model cannot learn from a teacher "
                         "(distillable: sasrec, gru4rec, itemlm)")
    paths = teacher_paths(d.teacher)
    if "" in paths:
        raise ValueError(f"distill.teacher={d.teacher!r}: an empty checkpoint path between commas")
    teachers = [Teacher(path, ds, model.device) for path in paths]
    ours = model.n_labels(seqs)
    for teacher in teachers:
        if not callable(getattr(type(teacher.model), "label_scores", None)) or not teacher.model.distillable:
            raise ValueError(f"distill.teacher={teacher.path}: a {teacher.model.name} checkpoint cannot be a "
                             "teacher (teachers: sasrec, gru4rec, itemlm)")
        theirs = teacher.model.n_labels(seqs)
        if ours != theirs:
            raise ValueError(f"distill.teacher={teacher.path} supervises {theirs} labels of the training sequences, "
                             f"the student {ours}: train both with the same data.max_history "
                             "(and itemlm.supervise=all)")
    model.distillation = Distillation(d)
    # one teacher's raw scores, as before ensembles: the same training, bit for bit
    return teachers[0] if len(teachers) == 1 else Ensemble(teachers)
