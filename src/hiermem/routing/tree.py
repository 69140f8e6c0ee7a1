"""Hierarchical k-means tree (paper App. C) and greedy routing down it (paper Sec. 2.1).

Node ids are global per level: level l (0-based; the paper's level l+1) has branching**(l+1) nodes and
the children of node i at level l are i*branching .. i*branching+branching-1 at level l+1. A path is
one node id per level; the leaf id alone determines the path (see `paths_from_leaves`).

Queries and training vectors are both L2-normalised before any distance is taken, so routing is a pure
function of (tree, embedding direction). Training documents are assigned to children with the same
distance kernel that `Tree.route` uses, so a document's training path is exactly `route` of its embedding.

The balance rule (routing.balance) binds only inside k-means: in every Lloyd step of a node, a child may
take at most balance/branching of that step's assignments. The examples of a node then go to their
nearest child with no cap, so the fitted tree's own cluster sizes may already exceed it; `hiermem cluster`
fits on a sample (routing.fit_docs) and routes every document by the same plain descent as inference, so
the final sizes over the whole corpus (its cluster report) can exceed the cap further.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hiermem.errors import HiermemError
from hiermem.io_utils import atomic_write_with
from hiermem.routing.embedders import l2_normalize

TREE_FORMAT = "hiermem-tree"
TREE_VERSION = 1
_ROUTE_CHUNK = 2048  # queries per chunk: bounds the [chunk, branching, dim] distance buffer


def _sq_dists(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Squared L2 distance of x [n,d] to per-row candidates c [n,b,d] (or shared [b,d]) -> [n,b].

    Computed as the sum of squared differences (not |x|^2 - 2x.c + |c|^2): every row's result
    depends only on that row, never on batch size or BLAS blocking, which keeps routing exact
    and reproducible (and avoids cancellation for near-identical vectors).
    """
    out = np.empty((x.shape[0], c.shape[-2]), dtype=np.float32)
    for a in range(0, x.shape[0], _ROUTE_CHUNK):  # bounds the [chunk, b, d] difference buffer
        xa = x[a : a + _ROUTE_CHUNK]
        ca = c[a : a + _ROUTE_CHUNK] if c.ndim == 3 else c[None]
        diff = ca - xa[:, None, :]
        out[a : a + len(xa)] = np.einsum("nbd,nbd->nb", diff, diff)
    return out


def paths_from_leaves(leaves: np.ndarray, depth: int, branching: int) -> np.ndarray:
    """Full path [n, depth] from leaf ids: paths[:, l] = leaf // branching**(depth-1-l)."""
    leaves = np.asarray(leaves, dtype=np.int64)
    div = branching ** np.arange(depth - 1, -1, -1, dtype=np.int64)
    return leaves[:, None] // div[None, :]


@dataclass
class Tree:
    depth: int
    branching: int
    centroids: list[np.ndarray]  # centroids[l]: float32 [branching**(l+1), dim]

    def __post_init__(self) -> None:
        self.centroids = [np.ascontiguousarray(c, dtype=np.float32) for c in self.centroids]
        problem = self._check()
        if problem:
            raise HiermemError(f"tree: {problem}")

    def _check(self) -> str | None:
        if self.depth < 1 or self.branching < 2:
            return f"depth {self.depth} must be >= 1 and branching {self.branching} >= 2"
        if len(self.centroids) != self.depth:
            return f"{len(self.centroids)} centroid levels for depth {self.depth}"
        dim = self.centroids[0].shape[-1] if self.centroids[0].ndim == 2 else -1
        for l, c in enumerate(self.centroids):
            if c.shape != (self.n_nodes(l), dim) or dim < 1:
                return f"level {l} centroids have shape {c.shape}, expected ({self.n_nodes(l)}, {dim})"
            if not np.isfinite(c).all():
                return f"level {l} centroids contain NaN/inf"
        return None

    @property
    def dim(self) -> int:
        return int(self.centroids[0].shape[1])

    def n_nodes(self, level: int) -> int:
        return self.branching ** (level + 1)

    def route(self, X: np.ndarray, exclude: dict[int, np.ndarray] | None = None) -> np.ndarray:
        """Greedy descent: at each level take the nearest (squared L2) of the current node's children.

        X [n, dim] is L2-normalised here (like the training vectors). Ties go to the lowest index.
        `exclude[l]` ([n] node ids at level l, -1 = none) names a node query i may not enter at level l;
        it then takes the next-best sibling (the paper's blocking experiment). Returns int64 [n, depth]
        of global node ids.
        """
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self.dim:
            raise HiermemError(f"tree.route: embeddings have shape {X.shape}, the tree expects [n, {self.dim}]")
        X = l2_normalize(X)
        n = X.shape[0]
        exclude = {int(l): np.broadcast_to(np.asarray(v, dtype=np.int64), (n,)) for l, v in (exclude or {}).items()}
        for l in exclude:
            if not 0 <= l < self.depth:
                raise HiermemError(f"tree.route: exclude level {l} outside 0..{self.depth - 1}")
        paths = np.empty((n, self.depth), dtype=np.int64)
        offs = np.arange(self.branching, dtype=np.int64)
        for a in range(0, n, _ROUTE_CHUNK):
            x = X[a : a + _ROUTE_CHUNK]
            parent = np.zeros(len(x), dtype=np.int64)
            for l in range(self.depth):
                children = parent[:, None] * self.branching + offs[None, :]  # [m, b]
                d = _sq_dists(x, self.centroids[l][children])
                if l in exclude:
                    d[children == exclude[l][a : a + _ROUTE_CHUNK, None]] = np.inf
                parent = children[np.arange(len(x)), np.argmin(d, axis=1)]  # argmin: first minimum wins
                paths[a : a + len(x), l] = parent
        return paths

    def fingerprint(self) -> str:
        """sha256 of the shape and the centroid bytes: artifacts built for another tree are refused."""
        h = hashlib.sha256(f"{TREE_FORMAT}:{self.depth}:{self.branching}:{self.dim}".encode())
        for c in self.centroids:
            h.update(np.ascontiguousarray(c, dtype="<f4").tobytes())
        return h.hexdigest()

    def save(self, path: str | Path) -> None:
        """One .npz: arrays level0..level{depth-1} plus a JSON `meta` string; written atomically."""
        meta = {"format": TREE_FORMAT, "version": TREE_VERSION, "depth": self.depth, "branching": self.branching,
                "dim": self.dim, "fingerprint": self.fingerprint()}
        arrays = {f"level{l}": c for l, c in enumerate(self.centroids)}

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # a file object, or numpy appends ".npz" to the temp name
                np.savez(f, meta=np.array(json.dumps(meta, sort_keys=True)), **arrays)

        atomic_write_with(path, write)

    @classmethod
    def load(cls, path: str | Path) -> "Tree":
        path = Path(path)
        if not path.is_file():
            raise HiermemError(f"{path}: tree file not found (run `hiermem cluster` first)")
        try:
            # our own handle: np.load leaks the one it opens when the file is not a readable zip
            with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"][()]))
                depth, branching = int(meta["depth"]), int(meta["branching"])
                centroids = [np.array(z[f"level{l}"]) for l in range(depth)]
        except HiermemError:
            raise
        except Exception as e:  # zip/npy/JSON/key errors all mean the same thing to the user
            reason = " ".join(f"{type(e).__name__}: {e}".split())  # keep the message on one line
            raise HiermemError(f"{path}: not a readable hiermem tree file ({reason})") from e
        if meta.get("format") != TREE_FORMAT or meta.get("version") != TREE_VERSION:
            raise HiermemError(f"{path}: not a {TREE_FORMAT} v{TREE_VERSION} file (meta {meta.get('format')!r} "
                               f"v{meta.get('version')!r})")
        try:
            tree = cls(depth, branching, centroids)
        except HiermemError as e:
            raise HiermemError(f"{path}: inconsistent tree ({e})") from e
        if tree.fingerprint() != meta.get("fingerprint"):
            raise HiermemError(f"{path}: centroids do not match the stored fingerprint (file corrupt?)")
        return tree


# ---------------------------------------------------------------- fitting


def balance_assignments(assign: np.ndarray, k: int, cap: float, rng: np.random.Generator) -> np.ndarray:
    """Jégou-style balancing: while a cluster holds more than `cap` assignments, split its points
    evenly at random with the currently smallest cluster. Returns a new array.

    Each split equalises the two counts, which strictly lowers the sum of squared counts, so the loop
    ends; it also stops when the largest and smallest differ by <= 1 (a cap below the mean cannot be met).
    """
    assign = np.array(assign, dtype=np.int64, copy=True)
    for _ in range(8 * k + 64 * int(np.log2(len(assign) + 2))):
        counts = np.bincount(assign, minlength=k)
        big = int(np.argmax(counts))
        if counts[big] <= cap:
            break
        small = int(np.argmin(counts))
        move = (int(counts[big]) - int(counts[small])) // 2
        if move <= 0:
            break
        members = np.flatnonzero(assign == big)
        assign[rng.choice(members, size=move, replace=False)] = small
    return assign


def _kmeanspp(X: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (D^2 sampling); uniform when every point already coincides with a seed."""
    n = X.shape[0]
    C = np.empty((k, X.shape[1]), dtype=np.float32)
    C[0] = X[rng.integers(n)]
    d2 = _sq_dists(X, C[0:1])[:, 0]
    for j in range(1, k):
        total = float(d2.sum(dtype=np.float64))
        idx = int(rng.integers(n)) if total <= 0 else int(rng.choice(n, p=d2.astype(np.float64) / total))
        C[j] = X[idx]
        d2 = np.minimum(d2, _sq_dists(X, C[j : j + 1])[:, 0])
    return C


def _nearest_faiss(X: np.ndarray, C: np.ndarray) -> np.ndarray:
    import faiss

    index = faiss.IndexFlatL2(C.shape[1])
    index.add(np.ascontiguousarray(C, dtype=np.float32))
    _, idx = index.search(np.ascontiguousarray(X, dtype=np.float32), 1)
    return idx[:, 0].astype(np.int64)


def cluster_sums(X: np.ndarray, assign: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """float64 [k, d]: the sum of the rows of X assigned to each cluster. The same sums, bit for bit, as
    np.add.at(sums, assign, X) (rows added in their order), which is several times slower: the rows are
    stably sorted by cluster and each cluster's run summed by np.add.reduceat."""
    sums = np.zeros((len(counts), X.shape[1]), dtype=np.float64)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    full = counts > 0
    if full.any():
        rows = X[np.argsort(assign, kind="stable")].astype(np.float64)
        sums[full] = np.add.reduceat(rows, starts[full], axis=0)
    return sums


def _kmeans_node(X: np.ndarray, members: np.ndarray, k: int, steps: int, sample: int, balance: float,
                 rng: np.random.Generator) -> np.ndarray:
    """Centroids [k, d] for one node (the rows `members` of X): k-means++ then `steps` balanced Lloyd
    steps on fresh subsets. Only subsets of at most `sample` rows are copied out of X."""
    n = len(members)
    m = min(sample, n)
    whole = X[members] if m == n else None

    def draw() -> np.ndarray:
        return whole if m == n else X[members[np.sort(rng.choice(n, size=m, replace=False))]]

    C = _kmeanspp(draw(), k, rng)
    for _ in range(steps):
        Xs = draw()
        assign = balance_assignments(_nearest_faiss(Xs, C), k, balance * len(Xs) / k, rng)
        counts = np.bincount(assign, minlength=k)
        new = (cluster_sums(Xs, assign, counts) / np.maximum(counts, 1)[:, None]).astype(np.float32)
        for j in np.flatnonzero(counts == 0):  # re-seed an empty cluster inside the largest one
            big = int(np.argmax(counts))
            new[j] = Xs[rng.choice(np.flatnonzero(assign == big))]
        C = new
    return C


def _small_node_children(X: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    """Children of a node with fewer than k examples: its examples in order, then copies cycling
    over them (copies never win a tie, so each distinct example gets its own child); a node with no
    examples gets k copies of its own centroid (queries reaching it go to its first child)."""
    if len(X) == 0:
        return np.repeat(own[None, :], k, axis=0)
    return X[np.arange(k) % len(X)].copy()


def fit_tree(X: np.ndarray, depth: int, branching: int, seed: int = 0, steps: int = 20, sample: int = 6400,
             balance: float = 1.5, progress: bool = True, return_paths: bool = False):
    """Fit the tree root -> leaves (paper App. C). Returns the Tree, or (Tree, training paths).

    At every node: k-means with k=branching on that node's examples (k-means++ seeding, `steps` Lloyd
    steps each on a fresh random subset of up to `sample` examples, faiss nearest-centroid assignment,
    balancing at share balance/branching); then all the node's examples go to their nearest child
    (plain routing, no balancing) and the recursion continues per child. Deterministic for a seed:
    each node draws from its own rng seeded by (seed, level, node).
    Memory: X is normalised into one copy; a node copies out only its k-means subsets (<= `sample` rows)
    and assigns its examples `_ROUTE_CHUNK` rows at a time, so nothing else grows with X beyond
    per-example index arrays.
    """
    from tqdm.auto import tqdm

    X = np.asarray(X)
    if X.ndim != 2 or X.shape[0] < 1 or X.shape[1] < 1:
        raise HiermemError(f"fit_tree: embeddings must be a non-empty [n, dim] array, got shape {X.shape}")
    if not np.isfinite(X).all():
        raise HiermemError("fit_tree: embeddings contain NaN/inf")
    if depth < 1 or branching < 2:
        raise HiermemError(f"tree: depth {depth} must be >= 1 and branching {branching} >= 2")
    if steps < 0 or sample < branching or balance < 1.0 or seed < 0:
        raise HiermemError(f"tree: need steps >= 0 (got {steps}), sample >= branching (got {sample}), "
                           f"balance >= 1 (got {balance}), seed >= 0 (got {seed})")
    X = l2_normalize(X)
    n = X.shape[0]
    parent_of = np.zeros(n, dtype=np.int64)  # node id of each example at the level above (root = 0)
    parent_cent = X.mean(axis=0, keepdims=True)  # the root's own centroid
    centroids, paths = [], np.empty((n, depth), dtype=np.int64)
    with tqdm(total=sum(branching**l for l in range(depth)), disable=not progress, desc="tree nodes",
              unit="node", dynamic_ncols=True) as bar:
        for l in range(depth):
            n_parents = branching**l
            C = np.empty((n_parents * branching, X.shape[1]), dtype=np.float32)
            order = np.argsort(parent_of, kind="stable")  # group examples by parent, keep input order
            bounds = np.searchsorted(parent_of[order], np.arange(n_parents + 1))
            for p in range(n_parents):
                members = order[bounds[p] : bounds[p + 1]]
                if len(members) < branching:
                    Cp = _small_node_children(X[members], parent_cent[p], branching)
                else:
                    rng = np.random.default_rng([seed, l, p])
                    Cp = _kmeans_node(X, members, branching, steps, sample, balance, rng)
                C[p * branching : (p + 1) * branching] = Cp
                # plain nearest child, with route()'s kernel (row by row, so chunking changes no bit):
                # training path == route()
                for a in range(0, len(members), _ROUTE_CHUNK):
                    rows = members[a : a + _ROUTE_CHUNK]
                    paths[rows, l] = p * branching + np.argmin(_sq_dists(X[rows], Cp), axis=1)
                bar.update(1)
            centroids.append(C)
            parent_of, parent_cent = paths[:, l].copy(), C
    tree = Tree(depth, branching, centroids)
    return (tree, paths) if return_paths else tree


def cluster_sizes(paths: np.ndarray, tree: Tree) -> list[np.ndarray]:
    """Number of examples per node, one array [n_nodes(l)] per level."""
    paths = np.asarray(paths)
    return [np.bincount(paths[:, l], minlength=tree.n_nodes(l)) for l in range(tree.depth)]
