"""The demo's report: the yes/no template prior, per-role summaries over seeds, the comparison's gaps,
and ``report.json`` / ``report.md`` / the plots. Pure functions of the scores (no training, no models)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from mllm_kd.eval.core import pct
from mllm_kd.eval.paired import paired_summary

STUDENT_ROLES = ("student_baseline", "student_matched", "student_kd")
# compute-matched and LLaVA-KD students that start from the teacher's trained projector instead of stage 1, and
# the compute-matched one with DFT's loss (the teacher's terms on the same one-run schedule)
TPROJ_ROLES = ("student_matched_tproj", "student_kd_tproj", "student_dft_tproj")
# LLaVA-KD with the distillation of the teacher's projected images added in DPT and DFT (loss.w_emb)
EMB_ROLES = ("student_kd_emb",)
# in a run whose DFT reads a transfer set (questions in no one's training data, answered by the teacher): the
# control, LLaVA-KD's DPT and SFT and then stage 3 on the teacher's answers without the distillation terms
SEQKD_ROLES = ("student_seqkd_transfer",)


def student_roles(results: dict) -> list[str]:
    """The student roles the results hold, in the report's order."""
    roles = (*STUDENT_ROLES, *TPROJ_ROLES, *EMB_ROLES, *SEQKD_ROLES)
    return [r for r in roles if r in results]


def other_roles(results: dict) -> list[str]:
    """The roles of a teacher of another family (``demo --teacher-llm``), when the results have them."""
    name = results.get("teacher_llm")
    return [f"teacher_{name}", f"student_kd_{name}"] if name else []


def yes_no_prior(prior: dict[str, str], truth: dict, questions: list[dict], predictions) -> dict:
    """How a model's yes/no answers relate to the template prior (``prior``: template -> the answer its
    wording predicts, :func:`~mllm_kd.data_prep.easyvqa.template_prior`).

    ``accuracy``: the prior's own accuracy on these yes/no questions; ``agreement``: the share of the
    model's yes/no answers equal to the prior's; ``accuracy_where_prior_wrong``: the model's accuracy on
    the questions the prior gets wrong (a model that only learned the wording scores 0 there).
    ``truth``: question id -> ``{"answer": ...}``; ``questions``: the question file's records.
    """
    from mllm_kd.data_prep.easyvqa_questions import YES_NO, question_template
    from mllm_kd.eval.normalize import simple_normalize
    from mllm_kd.eval.tasks.easyvqa import final_answer

    said = {str(p.question_id): simple_normalize(final_answer(p.text)) for p in predictions}
    rows = []
    for q in questions:
        answer = truth[str(q["question_id"])]["answer"]
        if answer not in YES_NO:
            continue
        template = question_template(q["text"].split("\n")[0])
        rows.append((prior.get(template, "no"), answer, said.get(str(q["question_id"]))))
    if not rows:
        return {}
    wrong = [r for r in rows if r[0] != r[1]]
    return {
        "n": len(rows),
        "accuracy": _pct(sum(p == a for p, a, _ in rows), len(rows)),
        "agreement": _pct(sum(p == s for p, _, s in rows), len(rows)),
        "accuracy_where_prior_wrong": _pct(sum(a == s for _, a, s in wrong), len(wrong)),
    }


def described_yes_no(truth: dict, questions: list[dict], predictions) -> dict:
    """For described yes/no answers ("blue rectangle, yes"): is the description right, and is the answer
    the one the model's own description implies?

    ``described``: the share of the yes/no answers in that form; ``known``: how many of them are about an
    image whose colour (shape) a colour (shape) question of the same split gives; ``description_right``:
    the share of those whose description names it; ``follows_description``: the share of the described
    answers that are what the description implies for the question (the colour or shape word it asks
    about, turned round by "not" / "no"). Empty when no yes/no answer is described.
    """
    from mllm_kd.data_prep.easyvqa_questions import YES_NO, asked_about, parse_described, shows

    said = {str(p.question_id): p.text for p in predictions}
    image_of = {str(q["question_id"]): q["image"] for q in questions}
    seen: dict[tuple[str, str], str] = {}  # (image, "color" | "shape") -> the split's answer
    for qid, item in truth.items():
        if item.get("type") in ("color", "shape") and str(qid) in image_of:
            seen[(image_of[str(qid)], item["type"])] = item["answer"]
    n = described = known = right = follows = 0
    for q in questions:
        qid = str(q["question_id"])
        if truth[qid]["answer"] not in YES_NO:
            continue
        n += 1
        parts = parse_described(said.get(qid, ""))
        if parts is None:
            continue
        described += 1
        color, shape, answer = parts
        shapes, colors, negated = asked_about(q["text"].split("\n")[0])
        present = shows(shapes | colors, color, shape)
        follows += answer == ("yes" if present != negated else "no")
        for kind, named, shown in (("shape", shapes, shape), ("color", colors, color)):
            if named and (q["image"], kind) in seen:
                known += 1
                right += shown == seen[(q["image"], kind)]
    if not described:
        return {}
    return {
        "n": n,
        "described": _pct(described, n),
        "known": known,
        "description_right": _pct(right, known),
        "follows_description": _pct(follows, described),
    }


def _pct(k: int, n: int) -> float | None:
    return pct(k / n) if n else None


def summarise(per_seed: dict[int, dict]) -> dict:
    """One student role over its seeds: means of the scores, the spread (max - min), and every seed."""
    runs = list(per_seed.values())
    first = runs[0]
    out = {
        "accuracy": statistics.fmean(r["accuracy"] for r in runs),
        "by_type": {t: round(statistics.fmean(r["by_type"][t] for r in runs), 2) for t in first["by_type"]},
        "train_seconds": round(statistics.fmean(r["train_seconds"] for r in runs), 1),
        "parameters": first["parameters"],
        "llm_parameters": first["llm_parameters"],
        "n": first["n"],
        "missing": max(r.get("missing", 0) for r in runs),  # unanswered questions (the worst seed)
        "stages": first["stages"],
        "spread": max(r["accuracy"] for r in runs) - min(r["accuracy"] for r in runs),
        "yes_no_prior": _mean_fields([r["yes_no_prior"] for r in runs]),
        "seeds": {str(s): r for s, r in per_seed.items()},
    }
    if all(r.get("described_yes_no") for r in runs):
        out["described_yes_no"] = _mean_fields([r["described_yes_no"] for r in runs])
    return out


def _mean_fields(rows: list[dict]) -> dict:
    """The mean over seeds of each field every seed has a value for."""
    return {
        k: round(statistics.fmean(r[k] for r in rows), 2)
        for k, v in rows[0].items()
        if v is not None and all(r.get(k) is not None for r in rows)
    }


_LEAD = 3.0  # the lead over the compute-matched student that the main job's goal asks, in points


def paired_by_seed(kd: dict, matched: dict) -> dict:
    """LLaVA-KD minus the compute-matched student seed by seed (the seeds both ran), in points; with two seeds or
    more, the standard deviation of those differences, about how many seeds a paired comparison needs to tell
    a 3-point difference from none at that noise (normal approximation), and ``kd_minus_matched_paired``:
    the mean difference's 95% t-interval and the exact sign-flip p-value (``eval/paired.py``)."""
    diffs, paired = _paired(kd, matched)
    if not diffs:
        return {}
    out: dict = {"kd_minus_matched_by_seed": diffs}
    if paired:
        out["sd_kd_minus_matched"] = paired["sd"]
        out["seeds_to_show_3_points"] = paired["seeds_for_lead"]
        out["kd_minus_matched_paired"] = paired
    return out


def _paired(a: dict, b: dict) -> tuple[dict[str, float], dict | None]:
    """``a`` minus ``b`` seed by seed (the seeds both ran), in points, and with two seeds or more their
    :func:`~mllm_kd.eval.paired.paired_summary`."""
    seeds = [s for s in a.get("seeds", {}) if s in b.get("seeds", {})]
    diffs = {s: round(100 * (a["seeds"][s]["accuracy"] - b["seeds"][s]["accuracy"]), 2) for s in seeds}
    return diffs, paired_summary(list(diffs.values()), lead=_LEAD) if len(diffs) >= 2 else None


def gaps(results: dict) -> dict:
    """The comparison fixed in advance, in accuracy points (means over seeds); with the ``_tproj`` students,
    the same for the LLaVA-KD one that starts from the teacher's projector, and it against its own
    compute-matched counterpart (the teacher's projector with and without the distillation losses); with
    ``kd_emb``, it against the compute-matched plain student and against LLaVA-KD without the term; with
    ``seqkd_transfer`` (the same start and DFT data without the distillation terms), ``kd`` against it and it
    against the compute-matched student."""
    acc = {r: 100 * results[r]["accuracy"] for r in ("teacher", *student_roles(results))}
    # a run of some students only (``demo --students``): the gaps between the ones it has
    teacher_gap = acc["teacher"] - acc["student_baseline"] if "student_baseline" in acc else None

    def minus(a: str, b: str) -> float:
        return round(acc[f"student_{a}"] - acc[f"student_{b}"], 2)

    def closed(kd: str) -> float | None:  # share of the teacher-to-plain-student gap the student closes
        if teacher_gap is None or teacher_gap <= 0:
            return None
        return round((acc[f"student_{kd}"] - acc["student_baseline"]) / teacher_gap, 3)

    def spread(role: str) -> float:
        return round(100 * results[f"student_{role}"]["spread"], 2)

    def has(*roles: str) -> bool:
        return all(f"student_{r}" in acc for r in roles)

    out: dict = {}
    if has("baseline", "matched", "kd"):
        out |= {
            "kd_minus_baseline": minus("kd", "baseline"),
            "kd_minus_matched": minus("kd", "matched"),
            "matched_minus_baseline": minus("matched", "baseline"),
            "gap_closed": closed("kd"),
            "spread_kd": spread("kd"),
            "spread_matched": spread("matched"),
            **paired_by_seed(results["student_kd"], results["student_matched"]),
        }

    def variant(kd: str, controls: tuple[str, ...], spreads: tuple[str, ...]) -> dict:
        """A student past the paper's comparison: it minus each control the run has, the gap it closes, the
        spreads."""
        minus_controls = {f"{kd}_minus_{c}": minus(kd, c) for c in controls if has(c)}
        return {
            **minus_controls,
            f"gap_closed_{kd}": closed(kd),
            **{f"spread_{r}": spread(r) for r in spreads if has(r)},
        }

    if has("matched", "matched_tproj", "kd_tproj"):
        out |= variant("kd_tproj", ("matched", "matched_tproj"), ("kd_tproj", "matched_tproj"))
    if has("dft_tproj", "matched_tproj"):
        out |= variant("dft_tproj", ("matched", "matched_tproj", "kd_tproj"), ("dft_tproj", "matched_tproj"))
    for a, b in (("dft_tproj", "matched_tproj"), ("dft_tproj", "matched"), ("kd_tproj", "matched_tproj")):
        if has(a, b):
            _, paired = _paired(results[f"student_{a}"], results[f"student_{b}"])
            if paired:
                out[f"{a}_minus_{b}_paired"] = paired
    if has("kd_emb", "matched", "kd"):
        out |= variant("kd_emb", ("matched", "kd"), ("kd_emb",))
    if has("seqkd_transfer", "matched", "kd"):
        out["kd_minus_seqkd_transfer"] = minus("kd", "seqkd_transfer")
        out |= variant("seqkd_transfer", ("matched",), ("seqkd_transfer",))
    return out


def _kd_lines(g: dict) -> list[str]:
    if "kd_minus_matched" not in g:  # a run of some students only
        return []
    return [
        f"LLaVA-KD minus plain student: {g['kd_minus_baseline']:+.2f} points; minus the compute-matched plain "
        f"student: {g['kd_minus_matched']:+.2f} (spreads: kd {g['spread_kd']:.2f}, matched "
        f"{g['spread_matched']:.2f}); share of the teacher-to-plain-student gap closed: {g['gap_closed']}.",
        "",
    ]


def _paired_lines(g: dict) -> list[str]:
    if "sd_kd_minus_matched" not in g:
        return []
    by_seed = " / ".join(f"{d:+.2f}" for d in g["kd_minus_matched_by_seed"].values())
    return [
        f"LLaVA-KD minus the compute-matched student, seed by seed ({', '.join(g['kd_minus_matched_by_seed'])}): "
        f"{by_seed}; standard deviation {g['sd_kd_minus_matched']:.2f} points, so telling a 3-point lead from "
        f"none (paired, 5% level, 80% power) takes about {g['seeds_to_show_3_points']} seeds.",
        *_interval_line(g.get("kd_minus_matched_paired")),
        "",
    ]


def _interval_line(paired: dict | None) -> list[str]:
    if not paired:  # reports written before the interval was added
        return []
    lo, hi = paired["ci95"]
    return [
        f"Mean difference {paired['mean']:+.2f} points over {paired['n']} seeds, 95% interval {lo:+.2f} to "
        f"{hi:+.2f} (paired t); one-sided sign-flip p = {paired['p_sign_flip']:.4f}."
    ]


def write_report(run: Path, results: dict, curves: dict[str, list[dict]]) -> None:
    """report.json, report.md, loss_curves.png and accuracy.png in ``run``.

    ``results``: the teacher and each of :data:`STUDENT_ROLES` (students as :func:`summarise` gives them)
    plus ``gaps``, ``seeds``, ``split``, ``recipe``, ``seconds``; ``curves``: name -> metrics.jsonl rows.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    roles = ["teacher", *student_roles(results), *other_roles(results)]
    (run / "report.json").write_text(json.dumps(results, indent=2))
    fig, axes = plt.subplots(1, len(curves), figsize=(3.2 * len(curves), 3), squeeze=False)
    for ax, (name, rows) in zip(axes[0], curves.items()):
        for term in ("loss", "ce", "mdist_resp", "mdist_vis", "rdist", "vemb"):
            if rows and term in rows[0]:
                ax.plot([r["step"] for r in rows], [r.get(term) for r in rows], label=term, linewidth=1)
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("step", fontsize=7)
        ax.set_yscale("log")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(run / "loss_curves.png", dpi=110)
    plt.close(fig)
    types = sorted(results["teacher"]["by_type"])
    fig, ax = plt.subplots(figsize=(7, 3))
    width = 0.8 / len(roles)
    for i, role in enumerate(roles):
        r = results[role]
        vals = [r["accuracy"] * 100] + [r["by_type"][t] for t in types]
        xs = [x + i * width for x in range(len(vals))]
        ax.bar(xs, vals, width, label=role)
        for seed_result in r.get("seeds", {}).values():  # each seed as a dot over the mean's bar
            pts = [seed_result["accuracy"] * 100] + [seed_result["by_type"][t] for t in types]
            ax.plot(xs, pts, "k.", markersize=3)
    ax.set_xticks([x + (len(roles) - 1) / 2 * width for x in range(len(types) + 1)], ["overall", *types])
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(run / "accuracy.png", dpi=110)
    plt.close(fig)
    g = results["gaps"]
    lines = [
        f"# easy-VQA ({results['recipe']} recipe): teacher, plain students, LLaVA-KD student",
        "",
        f"{results['split']} questions: {results['teacher']['n']}; student seeds {results['seeds']} "
        "(students: mean over seeds, spread = max - min). "
        + _dft_data(results.get("transfer_questions"))
        + f"Total time {results['seconds']:.0f} s (this invocation {results['wall_seconds']:.0f} s).",
        "",
        "| model | parameters (LLM) | accuracy | spread | "
        + " | ".join(types)
        + " | yes/no = prior | training time (s) | stages |",
        "|---|---|---|---|" + "---|" * len(types) + "---|---|---|",
    ]
    for role in roles:
        r = results[role]
        spread = f"{100 * r['spread']:.2f}" if "spread" in r else ""
        lines.append(
            f"| {role} | {r['parameters'] / 1e6:.2f}M ({r['llm_parameters'] / 1e6:.2f}M) | {100 * r['accuracy']:.2f} | "
            + f"{spread} | "
            + " | ".join(f"{r['by_type'][t]:.2f}" for t in types)
            + f" | {r['yes_no_prior'].get('agreement', float('nan')):.2f} | {r['train_seconds']:.0f} | "
            + f"{' -> '.join(r['stages'])} |"
        )
    prior = results["teacher"]["yes_no_prior"]
    lines += [
        "",
        f"yes/no template prior (each question's wording -> its template's majority train answer): "
        f"{prior.get('accuracy', float('nan')):.2f}% of the yes/no questions; 'yes/no = prior' is the share of a "
        "model's yes/no answers equal to it.",
        "",
        *_kd_lines(g),
        *_paired_lines(g),
        *_described_lines(results, roles),
        *_tproj_lines(g),
        *_dft_tproj_lines(g),
        *_seqkd_lines(g),
        *_emb_lines(g),
        *_other_teacher_lines(results),
        "![loss curves](loss_curves.png)",
        "",
        "![accuracy](accuracy.png)",
        "",
    ]
    (run / "report.md").write_text("\n".join(lines))


def _described_lines(results: dict, roles: list[str]) -> list[str]:
    """Described yes/no answers: is the description right, does the answer follow it (per model)."""
    rows = [(role, results[role].get("described_yes_no")) for role in roles]
    if not any(d for _, d in rows):
        return []
    return [
        'Described yes/no answers ("blue rectangle, yes"): the description right (where another question of '
        "the split gives the image's colour or shape), and the answer the one the model's own description "
        "implies:",
        "",
        "| model | described | description right | answer follows its description |",
        "|---|---|---|---|",
        *(
            f"| {role} | {d.get('described', float('nan')):.2f} | {d.get('description_right', float('nan')):.2f} | "
            f"{d.get('follows_description', float('nan')):.2f} |"
            for role, d in rows
            if d
        ),
        "",
    ]


def _tproj_lines(g: dict) -> list[str]:
    if "kd_tproj_minus_matched" not in g:
        return []
    return [
        "Starting from the teacher's trained projector instead of stage 1 (`_tproj`): LLaVA-KD minus the "
        f"compute-matched plain student: {g['kd_tproj_minus_matched']:+.2f} points; minus the compute-matched "
        f"student that also starts from the teacher's projector: {g['kd_tproj_minus_matched_tproj']:+.2f} "
        f"(spreads: kd_tproj {g['spread_kd_tproj']:.2f}, matched_tproj {g['spread_matched_tproj']:.2f}); share "
        f"of the teacher-to-plain-student gap closed: {g['gap_closed_kd_tproj']}.",
        "",
    ]


def _dft_tproj_lines(g: dict) -> list[str]:
    if "dft_tproj_minus_matched_tproj" not in g:
        return []
    parts = [
        "minus the compute-matched student from the teacher's projector with labels only: "
        f"{g['dft_tproj_minus_matched_tproj']:+.2f} points"
    ]
    if "dft_tproj_minus_matched" in g:
        parts.append(f"minus the compute-matched plain student: {g['dft_tproj_minus_matched']:+.2f}")
    if "dft_tproj_minus_kd_tproj" in g:
        parts.append(
            f"minus `kd_tproj` (the same terms after a separate SFT): {g['dft_tproj_minus_kd_tproj']:+.2f}"
        )
    closed = g.get("gap_closed_dft_tproj")
    lines = [
        "From the teacher's projector, DFT's loss (CE + the teacher's terms) on the compute-matched student's one-run "
        f"schedule (`dft_tproj`): {'; '.join(parts)} (spread dft_tproj {g['spread_dft_tproj']:.2f})"
        + (f"; share of the teacher-to-plain-student gap closed: {closed}." if closed is not None else "."),
    ]
    for key, what in (
        ("dft_tproj_minus_matched_tproj_paired", "`dft_tproj` minus `matched_tproj`"),
        ("dft_tproj_minus_matched_paired", "`dft_tproj` minus the compute-matched plain student"),
        ("kd_tproj_minus_matched_tproj_paired", "`kd_tproj` minus `matched_tproj`"),
    ):
        for line in _interval_line(g.get(key)):
            lines.append(f"{what}, paired by seed: {line[0].lower()}{line[1:]}")
    return [*lines, ""]


def _emb_lines(g: dict) -> list[str]:
    if "kd_emb_minus_matched" not in g:
        return []
    return [
        "LLaVA-KD with the teacher's projected images distilled in DPT and DFT (`kd_emb`, loss.w_emb): minus the "
        f"compute-matched plain student: {g['kd_emb_minus_matched']:+.2f} points; minus LLaVA-KD without it: "
        f"{g['kd_emb_minus_kd']:+.2f} (spreads: kd_emb {g['spread_kd_emb']:.2f}, matched {g['spread_matched']:.2f}); "
        f"share of the teacher-to-plain-student gap closed: {g['gap_closed_kd_emb']}.",
        "",
    ]


def _dft_data(transfer_questions: int | None) -> str:
    if not transfer_questions:
        return "DFT on the students' SFT questions (as LLaVA-KD). "
    return (
        f"DFT on a transfer set of {transfer_questions} training questions in no model's data, answered by the "
        "teacher; the compute-matched student's SFT takes as many steps as SFT + that DFT. "
    )


def _seqkd_lines(g: dict) -> list[str]:
    if "kd_minus_seqkd_transfer" not in g:
        return []
    return [
        "The control on the transfer set (`seqkd_transfer`: LLaVA-KD's DPT and SFT, then the same DFT steps on the "
        f"teacher's answers without the distillation terms): LLaVA-KD minus it: {g['kd_minus_seqkd_transfer']:+.2f} "
        f"points; it minus the compute-matched plain student: {g['seqkd_transfer_minus_matched']:+.2f} (spread "
        f"seqkd_transfer {g['spread_seqkd_transfer']:.2f}); share of the teacher-to-plain-student gap closed: "
        f"{g['gap_closed_seqkd_transfer']}.",
        "",
    ]


def _other_teacher_lines(results: dict) -> list[str]:
    """The comparison of the two teachers' students (``demo --teacher-llm``), with the aligned shares."""
    roles = other_roles(results)
    if not roles:
        return []
    teacher, student = (results[r] for r in roles)
    seeds = "; ".join(
        f"seed {s}: {100 * r['accuracy']:.2f}, aligned "
        + ", ".join(f"{stage} {share:.3f}" for stage, share in r.get("aligned", {}).items())
        for s, r in student["seeds"].items()
    )
    return [
        f"Teacher of another family ({results['teacher_llm']}): teacher {100 * teacher['accuracy']:.2f} against "
        f"{100 * results['teacher']['accuracy']:.2f}; the LLaVA-KD student it teaches across tokenizers "
        f"{100 * student['accuracy']:.2f} against {100 * results['student_kd']['accuracy']:.2f} "
        f"({results['gaps'][f'{roles[1]}_minus_student_kd']:+.2f} points). Per seed ({seeds}; aligned: the "
        "share of response positions with a teacher counterpart, mean over the stage's logged steps).",
        "",
    ]
