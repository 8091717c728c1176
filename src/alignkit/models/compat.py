"""Checks that two models can be compared token by token (on-policy distillation: a teacher
scoring a student's tokens, docs/objectives.md)."""

from __future__ import annotations

from alignkit.errors import UserError

__all__ = ["check_same_vocabulary"]


def _size(model) -> int | None:
    """Rows of the model's output layer (its logits' last dimension), or None if unknown."""
    if model is None:
        return None
    try:
        head = model.get_output_embeddings()
        if head is not None and getattr(head, "weight", None) is not None:
            return int(head.weight.shape[0])
    except (AttributeError, NotImplementedError):
        pass
    cfg = getattr(model, "config", None)
    v = getattr(cfg, "vocab_size", None) if cfg is not None else None
    return int(v) if v else None


def check_same_vocabulary(student_tokenizer, teacher_tokenizer, student: str = "the student",
                          teacher: str = "the teacher", student_model=None, teacher_model=None) -> int:
    """Refuse a teacher whose token ids mean something else than the student's.

    Distillation compares log pi_student(y_t) with log pi_teacher(y_t) for the same token id y_t
    (and, for the full-vocabulary divergences, whole rows of logits), so both tokenizers must map
    every token string to the same id. Output layers padded to different sizes beyond the
    tokenizer (e.g. 151,936 vs 152,064 rows in one model family) are fine: the divergences use the
    first len(tokenizer) entries.

    Returns the shared vocabulary size V = len(tokenizer). Raises UserError (one line: both names,
    the sizes, the first differing token, the fix) when the vocabularies differ, or when a model's
    output layer has fewer rows than V.
    """
    sv, tv = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if sv != tv:
        diff = ""
        for tok_str in sorted(set(sv) | set(tv), key=lambda s: (min(sv.get(s, 1 << 62), tv.get(s, 1 << 62)), s)):
            a, b = sv.get(tok_str), tv.get(tok_str)
            if a != b:
                where_s = f"id {a}" if a is not None else "absent"
                where_t = f"id {b}" if b is not None else "absent"
                diff = f"; first difference: token {tok_str!r} is {where_s} in the student, {where_t} in the teacher"
                break
        raise UserError(
            f"teacher {teacher} has a different vocabulary from student {student} ({len(tv)} vs {len(sv)} tokens{diff}); "
            "distillation compares the two models token by token, so pick a teacher that shares the student's "
            "tokenizer (the same model family)"
        )
    n = len(student_tokenizer)
    for name, model in ((f"student {student}", student_model), (f"teacher {teacher}", teacher_model)):
        rows = _size(model)
        if rows is not None and rows < n:
            raise UserError(f"{name}: its output layer has {rows} rows but the tokenizer has {n} tokens; the model "
                            "and tokenizer do not belong together")
    return n
