"""Knowledge distillation (config ``distill``, training/distill.py): the objective on known
answers, teachers and students that pair their labels, and clear refusals otherwise."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from itemgen.core.config import ConfigError, DistillConfig, from_dict
from itemgen.data.synthetic import make_dataset
from itemgen.models.checkpoint import CheckpointError, load_checkpoint
from itemgen.models.registry import build_model
from itemgen.training.distill import Distillation, Ensemble, Teacher, attach_distillation
from itemgen.training.loop import train


@pytest.fixture(scope="module")
def data():
    return make_dataset(n_users=80, n_items=24, min_len=4, max_len=7, seed=5)


def cfg_for(out, model="itemlm", distill=None, max_history=6, **extra):
    return from_dict({"model": model, "data": {"path": "x", "max_history": max_history},
                      "itemlm": {"backbone": "tiny", "prompt": "ids", "item_dim": 16, "id_only_share": 1.0,
                                 **extra.pop("itemlm", {})},
                      "sasrec": {"hidden": 16, "n_heads": 2}, "gru4rec": {"hidden": 16},
                      "distill": distill or {}, "repeat": extra.pop("repeat", {}),
                      "train": {"out": str(out), "max_steps": 2, "eval_every": 2, "eval_users": 10,
                                "progress": False, "batch_size": 16, "warmup_steps": 0, **extra}})


@pytest.fixture(scope="module")
def teacher_ckpt(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    return train(cfg_for(out, model="sasrec", max_steps=4, eval_every=4), dataset=data).best


def test_objective_known_answers():
    torch.manual_seed(0)
    logits, teacher = torch.randn(5, 7), torch.randn(5, 7)
    ce = torch.tensor(3.0)
    assert Distillation(DistillConfig(weight=0.0))(ce, logits, teacher) == pytest.approx(3.0)
    # a student that already matches the teacher pays only the CE share
    assert Distillation(DistillConfig(weight=0.3))(ce, teacher, teacher).item() == pytest.approx(0.7 * 3.0, abs=1e-5)
    # KL(q || p) summed over labels, at temperature 2 and scaled by T^2
    q, p = F.softmax(teacher / 2, 1), F.softmax(logits / 2, 1)
    kl = float((q * (q.log() - p.log())).sum())
    got = Distillation(DistillConfig(weight=1.0, temperature=2.0))(ce, logits, teacher)
    assert got.item() == pytest.approx(4 * kl, rel=1e-5)
    with pytest.raises(ValueError, match="same labels"):
        Distillation(DistillConfig())(ce, logits, teacher[:4])


def test_teacher_scores_every_label_in_the_students_order(data, teacher_ckpt):
    teacher = Teacher(str(teacher_ckpt), data)
    seqs = [s for s in data.split.train if len(s) >= 2][:5]
    scores = teacher.scores(seqs, np.random.default_rng(0))
    assert scores.shape == (sum(len(s) - 1 for s in seqs), data.n_items)
    # the row of label j of sequence 0 is the teacher's score of its prefix s[:j + 1]
    for j in range(len(seqs[0]) - 1):
        alone = teacher.model.scores([seqs[0][:j + 1]])[0]
        assert torch.allclose(scores[j], alone, atol=1e-5)


@pytest.mark.parametrize("student", ["itemlm", "sasrec", "gru4rec"])
def test_students_learn_from_a_sasrec_teacher(data, tmp_path, teacher_ckpt, student):
    cfg = cfg_for(tmp_path, model=student, distill={"teacher": str(teacher_ckpt), "weight": 0.5})
    res = train(cfg, dataset=data)
    assert res.step == 2
    model, saved, _ = load_checkpoint(res.best)
    assert saved.distill.teacher == str(teacher_ckpt)  # recorded, but the checkpoint stands alone
    assert model.distillation is None


def test_distillation_moves_the_student_towards_the_teacher(data, teacher_ckpt):
    cfg = cfg_for("unused", model="sasrec", distill={"teacher": str(teacher_ckpt), "weight": 1.0})
    student = build_model(cfg, data.items).eval()  # no dropout: the loss is a function of the weights
    seqs = [s for s in data.split.train if len(s) >= 2][:8]
    teacher = attach_distillation(student, cfg, data, seqs)
    rng = np.random.default_rng(0)
    batch = student.train_batch(seqs, rng)
    batch["teacher_scores"] = teacher.scores(seqs, rng)
    # weight 1: the loss is T^2 * KL, zero when the student IS the teacher
    teacher.model.distillation = student.distillation
    assert teacher.model.loss(batch).item() == pytest.approx(0.0, abs=1e-4)
    teacher.model.distillation = None
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    before = student.loss(batch).item()
    for _ in range(5):
        opt.zero_grad()
        student.loss(batch).backward()
        opt.step()
    assert before > 0 and student.loss(batch).item() < 0.8 * before


def test_bad_teachers_and_students_are_refused(data, tmp_path, teacher_ckpt):
    seqs = [s for s in data.split.train if len(s) >= 2]
    with pytest.raises(CheckpointError, match="distill.teacher"):
        cfg = cfg_for(tmp_path, model="sasrec", distill={"teacher": str(tmp_path / "nothing")})
        attach_distillation(build_model(cfg, data.items), cfg, data, seqs)
    other = make_dataset(n_users=40, n_items=30, min_len=4, max_len=7, seed=1)
    cfg = cfg_for(tmp_path, model="sasrec", distill={"teacher": str(teacher_ckpt)})
    with pytest.raises(CheckpointError, match="another catalog"):
        attach_distillation(build_model(cfg, other.items), cfg, other, seqs)
    cfg = cfg_for(tmp_path, model="sasrec", distill={"teacher": str(teacher_ckpt)}, max_history=2)
    with pytest.raises(ValueError, match="max_history"):  # the student truncates, the teacher does not
        attach_distillation(build_model(cfg, data.items), cfg, data, seqs)
    cfg = cfg_for(tmp_path, model="bert4rec", distill={"teacher": str(teacher_ckpt)})
    with pytest.raises(ValueError, match="cannot learn from a teacher"):
        attach_distillation(build_model(cfg, data.items), cfg, data, seqs)


@pytest.mark.parametrize("repeat", ["none", "recency"])
def test_a_two_level_student_learns_from_a_teacher(data, tmp_path, teacher_ckpt, repeat):
    """Its objective is over its exact log P(item): with weight 0 it is the two-level loss itself
    (the repeat bias in level 2), and training with a teacher moves it towards the teacher."""
    two = {"head": "two_level", "cluster_method": "random", "n_clusters": 4}
    data.save(tmp_path / "data")  # the clusters are built from the prepared dataset

    def cfg_at(out, **kw):
        values = cfg_for(out, itemlm=two, **kw).to_dict()
        values["data"]["path"] = str(tmp_path / "data")
        return from_dict(values)

    cfg = cfg_at(tmp_path, distill={"teacher": str(teacher_ckpt), "weight": 0.0}, repeat={"bias": repeat})
    torch.manual_seed(0)
    student = build_model(cfg, data.items).eval()
    seqs = [s for s in data.split.train if len(s) >= 2][:8]
    teacher = attach_distillation(student, cfg, data, seqs)
    rng = np.random.default_rng(0)
    batch = student.train_batch(seqs, rng)
    batch["teacher_scores"] = teacher.scores(seqs, rng)
    with_teacher = student.loss(batch).item()
    student.distillation = None
    assert with_teacher == pytest.approx(student.loss(batch).item(), rel=1e-5)
    res = train(cfg_at(tmp_path / "run", distill={"teacher": str(teacher_ckpt), "weight": 0.5}), dataset=data)
    assert res.step == 2 and load_checkpoint(res.best)[0].distillation is None


@pytest.fixture(scope="module")
def second_teacher(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher2")
    return train(cfg_for(out, model="sasrec", max_steps=4, eval_every=4, seed=1), dataset=data).best


def test_an_ensemble_of_teachers_is_the_mean_of_their_log_probabilities(data, teacher_ckpt, second_teacher):
    seqs = [s for s in data.split.train if len(s) >= 2][:6]
    one = cfg_for("unused", model="sasrec", distill={"teacher": str(teacher_ckpt), "weight": 1.0})
    single = attach_distillation(build_model(one, data.items), one, data, seqs)
    assert isinstance(single, Teacher)  # one teacher: its raw scores, as before ensembles
    both = cfg_for("unused", model="sasrec", distill={"teacher": f"{teacher_ckpt}, {second_teacher}", "weight": 1.0})
    student = build_model(both, data.items).eval()
    ensemble = attach_distillation(student, both, data, seqs)
    assert isinstance(ensemble, Ensemble) and len(ensemble.teachers) == 2
    got = ensemble.scores(seqs, np.random.default_rng(0))
    parts = [torch.log_softmax(Teacher(str(p), data).scores(seqs, np.random.default_rng(0)), 1)
             for p in (teacher_ckpt, second_teacher)]
    assert not torch.allclose(parts[0], parts[1], atol=1e-3)  # two different teachers
    assert torch.allclose(got, (parts[0] + parts[1]) / 2, atol=1e-6)
    # the same teacher twice is that teacher (temperature 1: the softmax renormalises the mean)
    twice = cfg_for("unused", model="sasrec", distill={"teacher": f"{teacher_ckpt},{teacher_ckpt}", "weight": 1.0})
    batch = student.train_batch(seqs, np.random.default_rng(0))
    losses = []
    for cfg in (one, twice):
        teacher = attach_distillation(student, cfg, data, seqs)
        losses.append(student.loss({**batch, "teacher_scores": teacher.scores(seqs, np.random.default_rng(0))}).item())
    assert losses[0] > 0 and losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_an_ensemble_trains_a_student_and_names_a_bad_teacher(data, tmp_path, teacher_ckpt, second_teacher):
    cfg = cfg_for(tmp_path / "run", distill={"teacher": f"{teacher_ckpt},{second_teacher}", "weight": 0.5})
    res = train(cfg, dataset=data)
    assert res.step == 2 and load_checkpoint(res.best)[0].distillation is None
    seqs = [s for s in data.split.train if len(s) >= 2]
    missing = tmp_path / "nothing"
    cfg = cfg_for(tmp_path, model="sasrec", distill={"teacher": f"{teacher_ckpt},{missing}"})
    with pytest.raises(CheckpointError, match=f"distill.teacher={missing}"):
        attach_distillation(build_model(cfg, data.items), cfg, data, seqs)
    cfg = cfg_for(tmp_path, model="sasrec", distill={"teacher": f"{teacher_ckpt},"})
    with pytest.raises(ValueError, match="empty checkpoint path"):
        attach_distillation(build_model(cfg, data.items), cfg, data, seqs)


@pytest.mark.parametrize("bad,msg", [({"weight": 1.5}, "distill.weight"), ({"temperature": 0}, "distill.temperature"),
                                     ({"teacher": "x", "sampled": 1}, "unknown config key")])
def test_bad_distill_config_names_the_key(bad, msg):
    with pytest.raises(ConfigError, match=msg):
        from_dict({"distill": bad})
    with pytest.raises(ConfigError, match="loss.kind=full"):
        from_dict({"distill": {"teacher": "x"}, "loss": {"kind": "warp"}})
    assert not math.isnan(DistillConfig().weight)
