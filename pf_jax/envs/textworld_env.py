"""TextWorld games through the real `textworld` package: generated offline, played through its API.

Games are generated with TextWorld's own generators (the `tw-make` challenges `tw-simple`, `tw-cooking`,
or a custom world via `textworld.make`) and compiled with the Inform 7 compilers shipped inside the
package (`textworld/thirdparty/inform7-6M62`: `ni` + `inform6`, static x86-64 binaries); the z-machine
games are then played through Jericho. Generated games are cached by (kind, settings, seed).

State key (RewardFlow's ALFWorld set-up: observation + inventory). With `state_key_source="description"`
(default) the observation part is the room description TextWorld reports for the current state (it
reflects opened/closed containers and doors and objects lying around), so a state reached by different
actions is one node. With `"feedback"` it is the last game feedback text, as the authors' ALFWorld code
keys states (anchor observation + inventory; look/inventory/examine keep the key, being no-ops). With `"facts"` the key is TextWorld's logical world state
(its sorted facts): exact, and about twice as fast to play as "description", which makes the game run an
extra `look` every step. Every won state maps to `SUCCESS_STATE_KEY`, every lost one to `LOST_STATE_KEY`.

An action is valid when it is one of the admissible commands (case and spacing ignored); an invalid
action is not sent to the game, the state is unchanged and the step is counted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pf_jax.config.cache import cache_root
from pf_jax.envs.protocol import (
    SUCCESS_STATE_KEY,
    EnvNotResetError,
    EpisodeFinishedError,
    StepResult,
    normalize_command,
)

LOST_STATE_KEY = "<lost>"
STATE_KEY_SOURCES = ("description", "feedback", "facts")
# Commands that only show information: with state_key_source="feedback" they keep the state key (no-ops).
INFORMATION_VERBS = ("look", "inventory", "examine")
GAME_KINDS = ("tw-simple", "tw-cooking", "custom")
DEFAULT_SETTINGS: dict[str, dict[str, Any]] = {
    "tw-simple": {"rewards": "sparse", "goal": "detailed", "test": False},
    "tw-cooking": {
        "recipe": 1,
        "take": 1,
        "go": 1,
        "open": False,
        "cook": False,
        "cut": False,
        "drop": False,
        "recipe_seed": 0,
        "split": None,
    },
    "custom": {"nb_rooms": 2, "nb_objects": 4, "quest_length": 3},
}
_PROMPT_TAIL = re.compile(r"\n>[^\n]*$")


def default_cache_dir() -> Path:
    """<pf_jax cache>/textworld ($PF_JAX_CACHE, default ~/.cache/pf_jax: pf_jax.config.cache)."""
    return cache_root() / "textworld"


def game_settings(kind: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The generator settings of `kind` with `overrides` applied; unknown kinds or keys are errors."""
    if kind not in DEFAULT_SETTINGS:
        raise ValueError(f"unknown TextWorld game kind {kind!r}; expected one of {GAME_KINDS}")
    settings = dict(DEFAULT_SETTINGS[kind])
    for key, value in (overrides or {}).items():
        if key not in settings:
            raise ValueError(
                f"unknown setting {key!r} for TextWorld kind {kind!r}; expected one of {sorted(settings)}"
            )
        settings[key] = value
    return settings


def generate_textworld_game(
    kind: str, seed: int, cache_dir: str | Path | None = None, settings: Mapping[str, Any] | None = None
) -> Path:
    """Generate (or reuse from the cache) one TextWorld game; returns the path of its .z8 file.

    kind: 'tw-simple' | 'tw-cooking' (the tw-make challenges) | 'custom' (textworld.make with nb_rooms,
    nb_objects, quest_length). The file name holds a hash of (kind, settings), so changed settings never
    reuse a stale game.
    """
    import textworld
    import textworld.challenges
    import textworld.generator

    full = game_settings(kind, settings)
    digest = hashlib.sha1(json.dumps([kind, full], sort_keys=True).encode()).hexdigest()[:10]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{kind}-{digest}-seed{seed}.z8"
    if path.is_file() and path.with_suffix(".json").is_file():
        return path
    # Build in a private folder and move into place with the .json last (the cache-hit test looks for
    # both files), so processes sharing a cache never read a half-written game.
    with tempfile.TemporaryDirectory(dir=cache, prefix=".generating-") as scratch:
        options = textworld.GameOptions()
        options.seeds = seed
        options.path = str(Path(scratch) / path.name)
        options.file_ext = ".z8"
        options.force_recompile = True
        if kind == "custom":
            options.nb_rooms = full["nb_rooms"]
            options.nb_objects = full["nb_objects"]
            options.quest_length = full["quest_length"]
            game_file, _ = textworld.make(options)
        else:
            _, make_game, _ = textworld.challenges.CHALLENGES[kind]
            game = make_game(settings=full, options=options)
            game_file = textworld.generator.compile_game(game, options)
        built = Path(game_file)
        if built != Path(options.path):
            raise RuntimeError(f"TextWorld wrote the game to {game_file}, expected {options.path}")
        for suffix in (".ni", ".z8", ".json"):
            if built.with_suffix(suffix).is_file():
                os.replace(built.with_suffix(suffix), path.with_suffix(suffix))
    return path


def clean_feedback(text: str) -> str:
    """Drop TextWorld's trailing command prompt / status line and collapse blank lines."""
    text = _PROMPT_TAIL.sub("", text.rstrip())
    text = "\n".join(line.strip() for line in text.splitlines())
    return re.sub(r"\n{3,}", "\n\n", text).strip()


@contextlib.contextmanager
def _quiet_jericho() -> Iterator[None]:
    """Silence Jericho's UnsupportedGameWarning: Jericho does not know TextWorld's generated games (no
    built-in walkthrough / valid-action support), but TextWorld tracks score, won, lost and admissible
    commands itself, so the warnings are noise on every reset."""
    from jericho.jericho import UnsupportedGameWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnsupportedGameWarning)
        yield


class TextWorldEnv:
    """TextWorld behind the `TextEnv` protocol.

    reset(task, seed): `task` is a path to a compiled game (.z8/.ulx), or a game kind ('tw-simple',
    'tw-cooking', 'custom') in which case the game for `seed` is generated into / loaded from the cache
    (for a game file the seed is unused: TextWorld games are deterministic).
    reward_mode 'win' gives 1.0 on winning (sparse, as in the paper); 'score' gives the score increase
    divided by the game's max score.
    """

    def __init__(
        self,
        cache_dir: str | Path | None = None,
        settings: Mapping[str, Mapping[str, Any]] | None = None,
        reward_mode: str = "win",
        state_key_source: str = "description",
    ):
        if reward_mode not in ("win", "score"):
            raise ValueError(f"TextWorldEnv: reward_mode must be 'win' or 'score', got {reward_mode!r}")
        if state_key_source not in STATE_KEY_SOURCES:
            raise ValueError(
                f"TextWorldEnv: state_key_source must be one of {STATE_KEY_SOURCES}, got {state_key_source!r}"
            )
        self.state_key_source = state_key_source
        self._last_feedback = ""
        for kind in settings or {}:
            game_settings(kind, (settings or {})[kind])  # validate early
        self.cache_dir = cache_dir
        self.settings = dict(settings or {})
        self.reward_mode = reward_mode
        self.game_path: Path | None = None
        self._env = None
        self._state = None
        self.done = False
        self._invalid_steps = 0

    @property
    def instructions(self) -> str:
        return (
            "You are playing a text adventure. Read the goal and the observations, then answer with one "
            "command per turn, chosen from the admissible commands."
        )

    def resolve_game(self, task: str, seed: int) -> Path:
        if task in GAME_KINDS:
            return generate_textworld_game(task, seed, self.cache_dir, self.settings.get(task))
        path = Path(task)
        if path.suffix in (".z8", ".ulx") and path.is_file():
            return path
        raise ValueError(
            f"TextWorld task {task!r} is neither a game kind {GAME_KINDS} nor an existing .z8/.ulx game file"
        )

    def reset(self, task: str, seed: int) -> str:
        import textworld

        path = self.resolve_game(task, seed)
        if path != self.game_path or self._env is None:
            self.close()
            infos = textworld.EnvInfos(
                admissible_commands=True,
                inventory=True,
                description=self.state_key_source == "description",
                facts=self.state_key_source == "facts",
                objective=True,
                won=True,
                lost=True,
                score=True,
                max_score=True,
                policy_commands=True,
                extras=["walkthrough"],
            )
            with _quiet_jericho():
                self._env = textworld.start(str(path), request_infos=infos)
            self.game_path = path
        with _quiet_jericho():
            self._state = self._env.reset()
        self.done = False
        self._invalid_steps = 0
        state = self._state
        if state.description is not None:
            self._last_feedback = clean_feedback(state.description)
        else:  # the first feedback is banner + objective + room; keep the room from its "-= Name =-" header
            feedback = clean_feedback(state.feedback or "")
            header = re.search(r"^-= .* =-$", feedback, re.MULTILINE)
            self._last_feedback = feedback[header.start() :] if header else feedback
        inventory = clean_feedback(state.inventory or "")
        return "\n\n".join(
            part for part in (clean_feedback(state.objective or ""), self._last_feedback, inventory) if part
        )

    def _require_state(self):
        if self._state is None:
            raise EnvNotResetError("TextWorldEnv: call reset(task, seed) before step() or state queries")
        return self._state

    def _observation_and_inventory(self) -> str:
        state = self._require_state()
        if self.state_key_source == "facts":
            return "\n".join(sorted(str(fact) for fact in state.facts))
        room = clean_feedback(state.description or "") if self.state_key_source == "description" else None
        return (
            f"{room if room is not None else self._last_feedback}\n\n{clean_feedback(state.inventory or '')}"
        )

    @property
    def state_key(self) -> str:
        state = self._require_state()
        if state.won:
            return SUCCESS_STATE_KEY
        if state.lost:
            return LOST_STATE_KEY
        return self._observation_and_inventory()

    @property
    def admissible_actions(self) -> tuple[str, ...]:
        return tuple(self._require_state().admissible_commands or ())

    @property
    def policy_commands(self) -> tuple[str, ...]:
        """TextWorld's shortest remaining command sequence to win from the current state."""
        return tuple(self._require_state().policy_commands or ())

    @property
    def walkthrough(self) -> tuple[str, ...]:
        return tuple(self._require_state().get("extra.walkthrough") or ())

    @property
    def invalid_steps(self) -> int:
        return self._invalid_steps

    def step(self, action: str) -> StepResult:
        state = self._require_state()
        if self.done:
            raise EpisodeFinishedError("TextWorldEnv.step: the episode has ended; call reset() first")
        command = normalize_command(action)
        admissible = {normalize_command(a): a for a in self.admissible_actions}
        if command not in admissible:
            self._invalid_steps += 1
            return StepResult(
                observation=f"Invalid action {action!r}: it is not an admissible command here.",
                reward=0.0,
                done=False,
                valid=False,
                state_key=self.state_key,
                admissible_actions=self.admissible_actions,
                info={"score": state.score},
            )
        previous_score = state.score or 0
        with _quiet_jericho():
            self._state, _, done = self._env.step(admissible[command])
        new = self._state
        feedback = clean_feedback(new.feedback or "")
        if not command.startswith(INFORMATION_VERBS):  # look/inventory/examine leave the world as it was
            self._last_feedback = feedback
        won, lost = bool(new.won), bool(new.lost)
        self.done = bool(done or won or lost)
        if self.reward_mode == "win":
            reward = 1.0 if won else 0.0
        else:
            reward = ((new.score or 0) - previous_score) / max(new.max_score or 1, 1)
        return StepResult(
            observation=feedback,
            reward=float(reward),
            done=self.done,
            valid=True,
            state_key=self.state_key,
            admissible_actions=self.admissible_actions,
            won=won,
            info={"score": new.score, "max_score": new.max_score, "lost": lost},
        )

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
        self._env = None
        self._state = None
        self.game_path = None
