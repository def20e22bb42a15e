"""Teacher fold check: a student must not distil from a teacher that was trained on its validation cases.

Why: the KD term hands the student what the teacher learned. If the teacher saw the student's validation cases
(e.g. the SAT-style teacher is fold 'all', or fold 0, and the student trains fold 1 of the same dataset), the
student's validation metrics are optimistic, silently. Checked at training start (the student's fold is known
there) and previewed by ``lorkd-kd set``.

How cases are matched: every case has a patient key ``DATASET/CASE``: its ``lorkd.case_sources`` record (written
by ``lorkd-merge``; split mode's ``c0_abdomen`` and ``c0_pelvis`` share ``DatasetXXX_Whole/c0``), else its own
dataset and id. The teacher's training cases are read from its fold of ``splits_final.json`` (the copy in its
model folder, else ``$nnUNet_preprocessed/<teacher dataset>/splits_final.json``); fold ``all`` means every case of
its dataset. A teacher of another dataset is matched through those keys (a student merged from the teacher's
dataset is linked to it); a teacher of an unrelated dataset cannot be checked, which is said in the log.

Only validation cases the student does not also train on count: a student that trains on a case has seen it
anyway (the demo's one-fold splits validate on a training case), so a fold-matched teacher always passes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from nnunetv2_lorkd.kd.config import KDConfigError, KDSettings, TeacherRef
from nnunetv2_lorkd.regions import RegionMapError, parse_case_sources

ALLOW_KEY = "allow_teacher_fold_overlap"
ALLOW_FLAG = "--allow-teacher-fold-overlap"
SPLITS_FILE = "splits_final.json"
_SHOWN = 5  # overlapping cases named in an error


class TeacherFoldOverlapError(KDConfigError):
    """The teacher was trained on cases the student validates on (or that cannot be ruled out)."""


@dataclass(frozen=True)
class TeacherTraining:
    """What the teacher was trained on, as far as its model folder and splits tell."""

    dataset: str | None  # the teacher's dataset (its plans' dataset_name); None: unknown
    fold: int | str
    keys: frozenset[str]  # patient keys of its training cases (fold 'all': its recorded sources)
    case_ids: frozenset[str]  # its training case ids
    every_case: bool  # fold 'all': every case of `dataset`
    sources: Mapping[str, str]  # its dataset's case -> DATASET/CASE record
    where: str  # where the training cases were read
    problem: str | None = None  # why they are unknown

    def datasets(self) -> set[str]:
        """Datasets its training images come from (its own and the recorded sources')."""
        return {d for d in [self.dataset, *(_dataset_of(k) for k in self.sources.values())] if d}


@dataclass(frozen=True)
class FoldCheck:
    """The result for one student fold. ``status``: 'ok'; 'overlap'; 'unknown' (a teacher of a related dataset
    whose training cases cannot be read); 'unchecked' (a teacher of an unrelated or unknown dataset)."""

    status: str
    overlap: tuple[str, ...]  # student validation cases the teacher trained on
    num_validation: int  # the student's validation cases it does not train on
    message: str  # one line: how it was checked and what was found


def _dataset_of(key: str) -> str:
    return key.partition("/")[0]


def _read_json(path: str) -> object:
    with open(path) as f:
        return json.load(f)


def _recorded_sources(dataset_json: object, where: str) -> dict[str, str]:
    section = dataset_json.get("lorkd") if isinstance(dataset_json, Mapping) else None
    if not isinstance(section, Mapping) or "case_sources" not in section:
        return {}
    try:
        return parse_case_sources(section["case_sources"], where)
    except RegionMapError as e:
        raise KDConfigError(f"{e}; the teacher fold check needs it to match cases") from None


def teacher_training(
    ref: TeacherRef,
    preprocessed_root: str | None,
    student_dataset: str | None = None,
    student_sources: Mapping[str, str] | None = None,
) -> TeacherTraining:
    """The teacher's training cases: from its model folder (plans.json names its dataset, dataset.json may record
    case sources) and its fold of splits_final.json. ``student_sources`` stands in for a teacher of the student's
    own dataset whose dataset.json predates the source record."""
    folder = ref.model_folder
    plans_file = os.path.join(folder, "plans.json")
    base = {"fold": ref.fold, "keys": frozenset(), "case_ids": frozenset(), "every_case": False, "sources": {}}
    if not os.path.isfile(plans_file):
        return TeacherTraining(None, where=folder, problem=f"{plans_file} is missing, so its dataset is unknown",
                               **base)  # fmt: skip
    try:
        dataset = _read_json(plans_file).get("dataset_name")  # type: ignore[union-attr]
    except (OSError, ValueError, AttributeError) as e:
        return TeacherTraining(None, where=folder, problem=f"{plans_file} cannot be read ({e})", **base)
    if not isinstance(dataset, str) or not dataset:
        return TeacherTraining(None, where=folder, problem=f"{plans_file} names no dataset_name", **base)
    dataset_file = os.path.join(folder, "dataset.json")
    sources: dict[str, str] = {}
    if os.path.isfile(dataset_file):
        try:
            raw = _read_json(dataset_file)
        except (OSError, ValueError) as e:
            raise KDConfigError(f"{dataset_file} cannot be read ({e}); the teacher fold check needs it") from None
        sources = _recorded_sources(raw, dataset_file)
    if not sources and dataset == student_dataset:
        sources = dict(student_sources or {})
    base["sources"] = sources

    def key(case: str) -> str:
        return sources.get(case, f"{dataset}/{case}")

    if ref.fold == "all":
        base.update(keys=frozenset(sources.values()), every_case=True)
        return TeacherTraining(dataset, where=f"fold 'all' = every case of {dataset}", **base)

    candidates = [os.path.join(folder, SPLITS_FILE)]
    if preprocessed_root:
        candidates.append(os.path.join(preprocessed_root, dataset, SPLITS_FILE))
    path = next((p for p in candidates if os.path.isfile(p)), None)
    if path is None:
        return TeacherTraining(dataset, where=" or ".join(candidates),
                               problem=f"no {SPLITS_FILE} in {' or '.join(candidates)}", **base)  # fmt: skip
    try:
        splits = _read_json(path)
    except (OSError, ValueError) as e:
        return TeacherTraining(dataset, where=path, problem=f"{path} cannot be read ({e})", **base)
    if not isinstance(splits, list):
        return TeacherTraining(dataset, where=path, problem=f"{path} is not a list of folds", **base)
    if int(ref.fold) >= len(splits):
        return TeacherTraining(
            dataset,
            where=path,
            problem=f"fold {ref.fold} is not in {path} ({len(splits)} folds): nnU-Net trained that fold on a random "
            "80:20 split that cannot be reconstructed",
            **base,
        )
    entry = splits[int(ref.fold)]
    train = entry.get("train") if isinstance(entry, Mapping) else None
    if not isinstance(train, list):
        return TeacherTraining(dataset, where=path, problem=f"fold {ref.fold} of {path} has no 'train' list", **base)
    cases = [str(c) for c in train]
    base.update(keys=frozenset(key(c) for c in cases), case_ids=frozenset(cases))
    return TeacherTraining(dataset, where=f"fold {ref.fold} of {path}", **base)


def check_teacher_fold(
    teacher: TeacherTraining,
    student_dataset: str,
    student_sources: Mapping[str, str],
    train_cases: Iterable[str],
    validation_cases: Iterable[str],
) -> FoldCheck:
    """Intersect the teacher's training cases with the student's validation cases (those it does not train on)."""
    train = set(train_cases)
    held_out = sorted(set(validation_cases) - train)

    def key(case: str) -> str:
        return student_sources.get(case, f"{student_dataset}/{case}")

    if not held_out:
        return FoldCheck("ok", (), 0, "the student trains on all of its validation cases, so a teacher cannot add any")
    if teacher.dataset is None:
        return FoldCheck("unchecked", (), len(held_out), f"cannot be checked: {teacher.problem}")
    same = teacher.dataset == student_dataset
    student_datasets = {student_dataset, *(_dataset_of(key(c)) for c in {*train, *held_out})}
    if not same and not student_datasets & teacher.datasets():
        return FoldCheck(
            "unchecked",
            (),
            len(held_out),
            f"cannot be checked: the teacher was trained on {teacher.dataset}, and no case of {student_dataset} "
            "comes from it (lorkd.case_sources); make sure it never saw the student's validation patients",
        )
    if teacher.problem is not None:
        return FoldCheck("unknown", (), len(held_out), f"the teacher's training cases are unknown: {teacher.problem}")
    if teacher.every_case:
        overlap = [
            c for c in held_out if same or _dataset_of(key(c)) == teacher.dataset or key(c) in teacher.keys
        ]
    else:
        overlap = [c for c in held_out if key(c) in teacher.keys or (same and c in teacher.case_ids)]
    how = "by case id" if same else f"through the case sources of {student_dataset}"
    if overlap:
        return FoldCheck("overlap", tuple(overlap), len(held_out), f"matched {how}; teacher cases: {teacher.where}")
    return FoldCheck(
        "ok", (), len(held_out), f"none of the {len(held_out)} validation cases is a teacher training case, "
        f"matched {how}; teacher cases: {teacher.where}"
    )  # fmt: skip


def _named(cases: Iterable[str], sources: Mapping[str, str], limit: int | None) -> str:
    cases = list(cases)
    shown = cases if limit is None else cases[:limit]
    text = ", ".join(f"{c} ({sources[c]})" if c in sources else c for c in shown)
    return text + (f", ... ({len(cases)} in all)" if len(shown) < len(cases) else "")


def enforce_teacher_fold(
    settings: KDSettings,
    student_dataset: str,
    configuration: str,
    student_sources: Mapping[str, str],
    train_cases: Iterable[str],
    validation_cases: Iterable[str],
    preprocessed_root: str | None,
    student_fold: int | str | None = None,
) -> str:
    """At student training start: raise :class:`TeacherFoldOverlapError` when the teacher was trained on the
    student's validation cases (or that cannot be ruled out for a teacher of a related dataset), unless
    lorkd_kd.json sets ``allow_teacher_fold_overlap``, in which case the returned log text carries a WARNING naming
    every such case. Otherwise returns one log line saying how it was checked."""
    ref = settings.teacher
    teacher = teacher_training(ref, preprocessed_root, student_dataset, student_sources)
    result = check_teacher_fold(teacher, student_dataset, student_sources, train_cases, validation_cases)
    fold = "" if student_fold is None else f" fold {student_fold}"
    of_student = f"the student{fold}" if fold else "the student"
    teacher_name = f"teacher {ref.model_folder} fold {ref.fold}"
    if result.status in ("ok", "unchecked"):
        return f"Teacher fold check (student{fold}): {result.status}, {result.message}"
    matched_fold = student_fold if student_fold not in (None, "all") else "F (the student's fold)"
    fix = (
        f"use a fold-matched teacher (trained on fold {matched_fold} of the same splits_final.json: `lorkd-kd set "
        f"-d {student_dataset} -c {configuration} --teacher {ref.model_folder} --teacher-fold {matched_fold}`), or "
        f"accept the leak with `lorkd-kd set ... {ALLOW_FLAG}` (\"{ALLOW_KEY}\": true in lorkd_kd.json)"
    )
    if result.status == "unknown":
        if settings.allow_teacher_fold_overlap:
            return (
                f"WARNING: teacher fold check (student{fold}) skipped by {ALLOW_KEY}: {result.message}; the "
                f"{teacher_name} may have been trained on the student's validation cases"
            )
        raise TeacherFoldOverlapError(
            f"cannot rule out that the {teacher_name} was trained on validation cases of {of_student}: "
            f"{result.message}. Fix: {fix}"
        )
    if settings.allow_teacher_fold_overlap:
        return (
            f"WARNING: {len(result.overlap)} of the {result.num_validation} validation cases of {of_student} are "
            f"training cases of the {teacher_name} ({result.message}); allowed by {ALLOW_KEY} in lorkd_kd.json, so "
            f"this fold's validation metrics are optimistic. Leaked cases: "
            f"{_named(result.overlap, student_sources, None)}"
        )
    raise TeacherFoldOverlapError(
        f"the {teacher_name} was trained on {len(result.overlap)} of the {result.num_validation} validation cases "
        f"of {of_student}: {_named(result.overlap, student_sources, _SHOWN)} "
        f"({result.message}); distilling from it leaks them into the student's validation. Fix: {fix}"
    )


def preview_student_folds(
    settings: KDSettings,
    student_dataset: str,
    student_sources: Mapping[str, str],
    preprocessed_dataset_folder: str,
) -> list[str]:
    """For ``lorkd-kd set`` (which does not know the student's fold): one line per fold of the student's
    splits_final.json saying whether training it with this teacher would pass the check at training start."""
    ref = settings.teacher
    root = os.path.dirname(os.path.abspath(preprocessed_dataset_folder))
    teacher = teacher_training(ref, root, student_dataset, student_sources)
    lines = []
    if ref.fold == "all" and teacher.dataset is not None:
        lines.append(
            f"  note: teacher fold 'all' was trained on every case of {teacher.dataset}: a student fold that "
            f"validates on cases of it is refused at training start (unless {ALLOW_FLAG})"
        )
    splits_file = os.path.join(preprocessed_dataset_folder, SPLITS_FILE)
    if not os.path.isfile(splits_file):
        lines.append(f"  {splits_file} does not exist yet: each student fold is checked at training start")
        return lines
    try:
        splits = _read_json(splits_file)
        folds = [(fold["train"], fold["val"]) for fold in splits]  # type: ignore[union-attr]
    except (OSError, ValueError, KeyError, TypeError) as e:
        lines.append(f"  {splits_file} cannot be read ({e}): each student fold is checked at training start")
        return lines
    for index, (train, val) in enumerate(folds):
        result = check_teacher_fold(teacher, student_dataset, student_sources, train, val)
        if result.status == "overlap":
            verdict = (
                f"REFUSED at training start: the teacher trained on {len(result.overlap)} of its "
                f"{result.num_validation} validation cases ({_named(result.overlap, student_sources, _SHOWN)})"
            )
        elif result.status == "unknown":
            verdict = f"REFUSED at training start: {result.message}"
        else:
            verdict = f"{result.status}: {result.message}"
        if result.status in ("overlap", "unknown") and settings.allow_teacher_fold_overlap:
            verdict = verdict.replace("REFUSED at training start", f"allowed by {ALLOW_FLAG}, logged as a WARNING")
        lines.append(f"  student fold {index}: {verdict}")
    return lines
