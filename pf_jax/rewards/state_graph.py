"""RewardFlow state graphs: merge a group's rollouts into one graph and propagate rewards over it.

RewardFlow (arXiv 2603.18859): the N rollouts of one task form a directed graph whose nodes are exact
state keys and whose edges are the transitions taken (self-loops dropped). A node's reward is the
environment reward received on first entering it (a start state has 0). Values are propagated by the
synchronous max-update to its fixed point, and each step is rewarded by the potential difference
V(s_{t+1}) - V(s_t) minus a penalty for an invalid action.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import networkx as nx
import numpy as np

from pf_jax.envs.episodes import Episode
from pf_jax.rewards.errors import RewardOutputError


@dataclasses.dataclass(frozen=True)
class StateGraph:
    """One group's graph. keys[i] names node i; edges are deduplicated (src, dst) pairs, src != dst;
    edge_actions[j] lists the actions seen on edge j (for inspection)."""

    keys: tuple[str, ...]
    node_reward: np.ndarray  # float64 [N]
    edge_src: np.ndarray  # int64 [E]
    edge_dst: np.ndarray  # int64 [E]
    edge_actions: tuple[tuple[str, ...], ...]

    @property
    def num_nodes(self) -> int:
        return len(self.keys)

    def index(self, key: str) -> int:
        try:
            return self._key_to_index[key]
        except KeyError:
            raise KeyError(
                f"state key {key!r} is not a node of this graph ({self.num_nodes} nodes)"
            ) from None

    @functools.cached_property
    def _key_to_index(self) -> dict[str, int]:
        return {k: i for i, k in enumerate(self.keys)}

    def to_networkx(self) -> nx.DiGraph:
        """The graph as a networkx DiGraph: node = key with attribute `reward`, edge attribute `actions`."""
        graph = nx.DiGraph()
        for key, reward in zip(self.keys, self.node_reward):
            graph.add_node(key, reward=float(reward))
        for s, d, actions in zip(self.edge_src, self.edge_dst, self.edge_actions):
            graph.add_edge(self.keys[s], self.keys[d], actions=actions)
        return graph


def build_state_graph(episodes: Sequence[Episode]) -> StateGraph:
    """Merge the episodes of one group into a StateGraph.

    Nodes appear in order of first occurrence (episode order, then step order). r(s) = env reward of the
    step that first entered s; an initial state seen first as a start gets r = 0. Self-loops (invalid
    actions, no-op moves) add no edge.
    """
    keys: list[str] = []
    index: dict[str, int] = {}
    rewards: list[float] = []
    edges: dict[tuple[int, int], list[str]] = {}

    def node(key: str, reward: float) -> int:
        if key not in index:
            index[key] = len(keys)
            keys.append(key)
            rewards.append(float(reward))
        return index[key]

    for episode in episodes:
        episode.check_consistent()
        current = node(episode.initial_state_key, 0.0)
        for step in episode.steps:
            nxt = node(step.next_state_key, step.env_reward)
            if nxt != current:
                actions = edges.setdefault((current, nxt), [])
                label = step.action if step.action is not None else ""
                if label not in actions:
                    actions.append(label)
            current = nxt
    pairs = list(edges)
    return StateGraph(
        keys=tuple(keys),
        node_reward=np.asarray(rewards, dtype=np.float64),
        edge_src=np.asarray([p[0] for p in pairs], dtype=np.int64),
        edge_dst=np.asarray([p[1] for p in pairs], dtype=np.int64),
        edge_actions=tuple(tuple(edges[p]) for p in pairs),
    )


def propagate_state_values(
    node_reward: np.ndarray,  # float [N], non-negative
    edge_src: np.ndarray,  # int [E]
    edge_dst: np.ndarray,  # int [E]
    gamma: float,
    keys: Sequence[str] | None = None,  # state key of each node, to name a bad reward
) -> np.ndarray:  # float64 [N]
    """Synchronous max-propagation of node rewards to its fixed point (RewardFlow, arXiv 2603.18859).

        V_0(s) = r(s);   V_{k+1}(s) = max( V_k(s), gamma * max_{s' in succ(s)} V_k(s') )

    For non-negative rewards and 0 <= gamma <= 1 the fixed point is V(s) = max_u gamma^{d(s->u)} r(u)
    (d = directed hop distance, d(s->s) = 0); it is reached after at most N - 1 updates, since a
    shortest path has at most N - 1 edges. States that reach no reward keep 0. A NaN or inf reward is a
    RewardOutputError naming its state: the max would carry it to every predecessor.
    """
    values = np.asarray(node_reward, dtype=np.float64).copy()
    edge_src = np.asarray(edge_src, dtype=np.int64)
    edge_dst = np.asarray(edge_dst, dtype=np.int64)
    if values.ndim != 1:
        raise ValueError(f"propagate_state_values: node_reward must be 1-D [N], got shape {values.shape}")
    if edge_src.shape != edge_dst.shape or edge_src.ndim != 1:
        raise ValueError(
            f"propagate_state_values: edge_src and edge_dst must be 1-D of equal length, got "
            f"{edge_src.shape} and {edge_dst.shape}"
        )
    bad = np.flatnonzero(~np.isfinite(values)) if values.ndim == 1 else []
    if len(bad):
        where = f"state {keys[bad[0]]!r}" if keys is not None else f"node {bad[0]}"
        raise RewardOutputError(f"propagate_state_values: {where} has reward {values[bad[0]]} ({len(bad)} of "
                                   f"{values.size} states not finite); an environment reward must be a finite number")
    if np.any(values < 0):
        raise ValueError(
            "propagate_state_values: node rewards must be non-negative (the max-propagation fixed point "
            f"is only defined for r >= 0), got min {values.min()}"
        )
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"propagate_state_values: gamma must be in [0, 1], got {gamma}")
    n = values.shape[0]
    if edge_src.size and (
        edge_src.min() < 0 or max(edge_src.max(), edge_dst.max()) >= n or edge_dst.min() < 0
    ):
        raise ValueError(f"propagate_state_values: edge endpoints must index the {n} nodes")
    for _ in range(max(n, 1)):
        best_successor = np.zeros(n, dtype=np.float64)  # values are >= 0, so 0 is a neutral floor
        np.maximum.at(best_successor, edge_src, values[edge_dst])
        updated = np.maximum(values, gamma * best_successor)
        if np.array_equal(updated, values):
            break
        values = updated
    return values


def potential_step_rewards(
    value_current: np.ndarray,  # float [S]: V(s_t)
    value_next: np.ndarray,  # float [S]: V(s_{t+1})
    valid: np.ndarray,  # bool [S]
    invalid_penalty: float = 0.1,
) -> np.ndarray:  # float64 [S]
    """RewardFlow step reward: r~_t = V(s_{t+1}) - V(s_t) - invalid_penalty * [action t invalid].

    Along one episode the sum telescopes: sum_t r~_t = V(s_T) - V(s_0) - invalid_penalty * #invalid.
    """
    value_current = np.asarray(value_current, dtype=np.float64)
    value_next = np.asarray(value_next, dtype=np.float64)
    valid = np.asarray(valid, dtype=bool)
    if not value_current.shape == value_next.shape == valid.shape:
        raise ValueError(
            f"potential_step_rewards: shapes differ: value_current {value_current.shape}, value_next "
            f"{value_next.shape}, valid {valid.shape}"
        )
    return value_next - value_current - invalid_penalty * (~valid)


def group_step_rewards(
    episodes: Sequence[Episode], gamma: float = 0.9, invalid_penalty: float = 0.1
) -> tuple[StateGraph, np.ndarray, list[np.ndarray]]:
    """Build one group's graph, propagate it, and reward every step by the potential difference.

    Returns (graph, values [N], per-episode step rewards [T_i] in episode order).
    """
    graph = build_state_graph(episodes)
    values = propagate_state_values(graph.node_reward, graph.edge_src, graph.edge_dst, gamma, keys=graph.keys)
    lookup = {k: i for i, k in enumerate(graph.keys)}
    per_episode = []
    for episode in episodes:
        cur = np.asarray([values[lookup[s.state_key]] for s in episode.steps], dtype=np.float64)
        nxt = np.asarray([values[lookup[s.next_state_key]] for s in episode.steps], dtype=np.float64)
        valid = np.asarray([s.valid for s in episode.steps], dtype=bool)
        per_episode.append(potential_step_rewards(cur, nxt, valid, invalid_penalty))
    return graph, values, per_episode
