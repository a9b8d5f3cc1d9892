"""The word vocabulary of the maze environment, for tiny policies trained from scratch on it.

The arithmetic `CharTokenizer` only knows digits and operators, so a tiny maze policy gets a small word
vocabulary (pf_jax.data.word_codec, lower-casing style): the lower-cased words, numbers and punctuation
marks of the maze's instructions, observations and the rollout prompt scaffolding.
"""

from __future__ import annotations

from collections.abc import Sequence

from pf_jax.data.word_codec import LOWER, WordCodec, WordTokenizer


def split_words(text: str) -> list[str]:
    """Lower-cased runs of letters, runs of digits and single punctuation marks, in order."""
    return LOWER.split(text)


def maze_word_codec(words: Sequence[str]) -> WordCodec:
    """The lower-casing WordCodec over `words` (saved as pf_jax_maze_tokenizer.json)."""
    return WordCodec(WordTokenizer(words, LOWER))


def maze_vocabulary(max_size: int = 32) -> list[str]:
    """Every token the maze and the rollout prompts produce for mazes up to max_size x max_size: the words
    of the instructions, observation templates and prompt scaffolding, plus the numbers 0..max_size."""
    from pf_jax.envs.maze import DIRECTIONS, MazeEnv
    from pf_jax.envs.rollout import RolloutConfig, build_messages

    env = MazeEnv(show_map=False)
    texts = [env.instructions, "You reached the goal!", "There is a wall that way. Unknown move 'x'.",
             "go " + " ".join(DIRECTIONS), "<action> </action> (none)"]
    first = env.reset("maze-3x3", 0)
    texts.append(first)
    texts += [m["content"] for m in build_messages(env.instructions, first, [], first, env.admissible_actions,
                                                   RolloutConfig(require_action_tags=True))]
    texts.append("Recent actions:\n[turn 0] action: north")
    words: list[str] = []
    for text in texts:
        for w in split_words(text):
            if not w.isdigit() and w not in words:
                words.append(w)
    return words + [str(i) for i in range(max_size + 1)]
