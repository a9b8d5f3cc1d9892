"""Synthetic multi-digit arithmetic: problems, a character tokenizer, an answer checker, a noisy corpus.

A problem is `a op b=` with answer `str(a op b)`. The noisy corpus gives each problem several
completions drawn from a fixed per-problem distribution in which the correct answer is the mode but
holds only `p_correct` (default 0.45) of the mass; the rest sits on plausible mistakes (one digit off by
one, a dropped carry, swapped digits, off by one or ten). A model fitted to it is a base model whose
greedy answer is usually right while its samples are often wrong: the setting in which distribution
sharpening (PowerFlow, alpha > 1) should raise sampled accuracy without labels.
"""

import dataclasses
import re
import zlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pf_jax.evaluation.answer_checkers import PredicateChecker

OPERATIONS = ("+", "-", "*")
DEFAULT_DIGITS = {"+": 3, "-": 3, "*": 2}
TEST_FRACTION_PER_MILLE = 100


@dataclasses.dataclass(frozen=True)
class ArithmeticProblem:
    a: int
    op: str
    b: int

    @property
    def prompt(self) -> str:
        return f"{self.a}{self.op}{self.b}="

    @property
    def result(self) -> int:
        return {"+": self.a + self.b, "-": self.a - self.b, "*": self.a * self.b}[self.op]

    @property
    def answer(self) -> str:
        return str(self.result)


def problem_split(problem: ArithmeticProblem) -> str:
    """'test' for a fixed ~10% of all problems (stable hash of the prompt), else 'train'."""
    return "test" if zlib.crc32(problem.prompt.encode()) % 1000 < TEST_FRACTION_PER_MILLE else "train"


def generate_problems(
    count: int,
    seed: int,
    split: str = "train",
    operations: Sequence[str] = ("+",),
    digits: dict[str, int] | None = None,
) -> list[ArithmeticProblem]:
    """`count` distinct problems of `split` ('train' or 'test', disjoint by `problem_split`).

    Operands are uniform in [0, 10**digits[op]); `digits` defaults to DEFAULT_DIGITS. Raises
    ValueError if the problem space of the split is too small for `count` distinct problems.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    unknown = [op for op in operations if op not in OPERATIONS]
    if unknown or not operations:
        raise ValueError(f"operations must be a non-empty subset of {OPERATIONS}, got {tuple(operations)}")
    digits = {**DEFAULT_DIGITS, **(digits or {})}
    rng = np.random.default_rng(seed)
    seen: set[ArithmeticProblem] = set()
    problems = []
    for _ in range(50 * count + 1000):
        if len(problems) == count:
            break
        op = operations[rng.integers(len(operations))]
        bound = 10 ** digits[op]
        problem = ArithmeticProblem(int(rng.integers(bound)), op, int(rng.integers(bound)))
        if problem not in seen and problem_split(problem) == split:
            seen.add(problem)
            problems.append(problem)
    if len(problems) < count:
        raise ValueError(
            f"found only {len(problems)} distinct '{split}' problems for operations {tuple(operations)} with "
            f"digits {digits}; asked for {count}"
        )
    return problems


_ANSWER = re.compile(r"^\s*(-?\d+)\s*$")


def parse_answer(completion: str) -> int | None:
    """The integer a completion states (text before the first newline), or None if it is not one."""
    match = _ANSWER.match(completion.split("\n", 1)[0])
    return int(match.group(1)) if match else None


def is_correct(problem: ArithmeticProblem, completion: str) -> bool:
    """Whether the completion's stated integer equals the problem's result."""
    return parse_answer(completion) == problem.result


def _plausible_mistakes(problem: ArithmeticProblem) -> list[int]:
    """Wrong answers a careless solver makes, most natural first (deterministic, may repeat)."""
    result = problem.result
    sign, digits = ("-", str(-result)) if result < 0 else ("", str(result))
    out: list[int] = []
    for i in range(len(digits)):  # one digit off by one
        for delta in (1, -1):
            d = int(digits[i]) + delta
            if 0 <= d <= 9 and not (i == 0 and d == 0 and len(digits) > 1):
                out.append(int(sign + digits[:i] + str(d) + digits[i + 1 :]))
    if problem.op == "+":  # every carry dropped
        a, b = str(problem.a), str(problem.b)
        width = max(len(a), len(b))
        no_carry = "".join(str((int(x) + int(y)) % 10) for x, y in zip(a.zfill(width), b.zfill(width)))
        out.append(int(no_carry))
    for i in range(len(digits) - 1):  # adjacent digits swapped
        swapped = digits[:i] + digits[i + 1] + digits[i] + digits[i + 2 :]
        if swapped[0] != "0":
            out.append(int(sign + swapped))
    out += [result + 10, result - 10, result + 1, result - 1, result + 2, result - 2, result + 100]
    return out


def noisy_answer_distribution(
    problem: ArithmeticProblem, p_correct: float = 0.45, num_wrong: int = 5, seed: int = 0
) -> list[tuple[int, float]]:
    """Answer distribution of the noisy corpus for one problem: [(answer, probability)], correct first.

    The correct answer has probability `p_correct`; `num_wrong` distinct plausible mistakes (chosen per
    problem with `seed`) share 1 - p_correct with weights proportional to 1/(k+1), k = 0..num_wrong-1.
    Raises ValueError unless the correct answer stays the unique mode.
    """
    if not 0.0 < p_correct < 1.0 or num_wrong < 1:
        raise ValueError(f"need 0 < p_correct < 1 and num_wrong >= 1, got {p_correct}, {num_wrong}")
    weights = 1.0 / np.arange(1, num_wrong + 1)
    wrong_probs = (1.0 - p_correct) * weights / weights.sum()
    if wrong_probs[0] >= p_correct:
        raise ValueError(
            f"p_correct={p_correct} with num_wrong={num_wrong} makes a wrong answer as likely "
            f"({wrong_probs[0]:.3f}) as the correct one; raise p_correct or num_wrong"
        )
    candidates = list(dict.fromkeys(m for m in _plausible_mistakes(problem) if m != problem.result))
    rng = np.random.default_rng([seed, zlib.crc32(problem.prompt.encode())])
    chosen = [candidates[i] for i in rng.permutation(len(candidates))[:num_wrong]]
    return [(problem.result, p_correct), *zip(chosen, wrong_probs.tolist())]


def noisy_corpus(
    problems: Sequence[ArithmeticProblem],
    completions_per_problem: int,
    seed: int,
    p_correct: float = 0.45,
    num_wrong: int = 5,
) -> list[dict[str, object]]:
    """SFT rows {prompt, completion, answer, correct}: completions sampled from each problem's
    `noisy_answer_distribution` (so about `p_correct` of the rows are correct)."""
    rng = np.random.default_rng(seed)
    rows: list[dict[str, object]] = []
    for problem in problems:
        answers, probs = zip(*noisy_answer_distribution(problem, p_correct, num_wrong, seed))
        for k in rng.choice(len(answers), size=completions_per_problem, p=np.asarray(probs)):
            completion = str(answers[k])
            rows.append(
                {"prompt": problem.prompt, "completion": completion, "answer": problem.answer,
                 "correct": completion == problem.answer}
            )
    return rows


# The synthetic task of the embedded default run: two-digit addition, problems split train / test by
# a fixed hash, a noisy SFT corpus whose mode is the right answer, and preference / KTO views of it.
TASK_OPERATIONS = ("+",)
TASK_DIGITS = {"+": 2}
TASK_SIZES = {"train": 4000, "test": 400}
NOISY_COMPLETIONS = 4


def arithmetic_task_rows(split: str, kind: str = "prompts") -> list[dict[str, object]]:
    """Rows of the default arithmetic task.

    kind: "prompts" {prompt, answer}; "noisy" SFT rows {prompt, completion, answer, correct} with
    NOISY_COMPLETIONS completions per problem from `noisy_answer_distribution`; "pairs" {prompt, chosen
    (correct), rejected (a sampled mistake)}; "kto" {prompt, completion, label} (label = correct).
    """
    problems = generate_problems(TASK_SIZES[split], seed=0, split=split, operations=TASK_OPERATIONS,
                                 digits=TASK_DIGITS)
    if kind == "prompts":
        return [{"prompt": p.prompt, "answer": p.answer} for p in problems]
    noisy = noisy_corpus(problems, NOISY_COMPLETIONS, seed=0 if split == "train" else 1)
    if kind == "noisy":
        return noisy
    if kind == "kto":
        return [{"prompt": r["prompt"], "completion": r["completion"], "label": bool(r["correct"])} for r in noisy]
    if kind == "pairs":
        rng = np.random.default_rng(2)
        rows = []
        for p in problems:
            wrong = [str(a) for a, _ in noisy_answer_distribution(p)[1:]]
            rows.append({"prompt": p.prompt, "chosen": p.answer, "rejected": wrong[int(rng.integers(len(wrong)))]})
        return rows
    raise ValueError(f"unknown arithmetic row kind {kind!r}; expected prompts, noisy, pairs or kto")


def arithmetic_answer(response: str) -> str | None:
    """The integer answer of a response as text, None when it has none."""
    value = parse_answer(response)
    return None if value is None else str(value)


ARITHMETIC_CHECKER = PredicateChecker(
    predicate=lambda response, reference: arithmetic_answer(response) == str(int(reference)),
    extract_answer=arithmetic_answer,
)


def digit_step_rewards(texts: Sequence[str], refs: Sequence[str], R: int) -> dict[str, jax.Array]:
    """Process supervision for answers written digit by digit: step j = the j-th answer character, step
    reward 1 if it matches the reference's j-th character (a missing or extra character scores 0)."""
    S = R
    rewards = np.zeros((len(texts), S), np.float32)
    step_mask = np.zeros((len(texts), S), bool)
    step_end = np.zeros((len(texts), S), np.int32)
    for i, (t, ref) in enumerate(zip(texts, refs, strict=True)):
        for j, ch in enumerate(t[:S]):
            rewards[i, j] = float(j < len(ref) and ch == ref[j])
            step_mask[i, j] = True
            step_end[i, j] = j
    return {"step_rewards": jnp.asarray(rewards), "step_mask": jnp.asarray(step_mask), "step_end": jnp.asarray(step_end)}
