"""A weighted blend of instruction datasets, deterministic from a seed.

Sample i comes from the dataset furthest behind its weight (the pretraining blend's
schedule), so any prefix matches the weights to within one sample per dataset; within a
dataset, records follow a fresh seeded permutation each time it runs out.
"""

from __future__ import annotations

import numpy as np

from retro_toolkit.errors import UserError


class InstructBlend:
    def __init__(self, names: list[str], sizes: list[int], weights: list[float], num_samples: int, seed: int):
        if not names:
            raise UserError("the instruction blend is empty: list at least one dataset under sft.datasets.")
        bad = [f"{n} ({w})" for n, w in zip(names, weights) if not isinstance(w, (int, float)) or w < 0]
        if bad:
            raise UserError(f"sft.datasets weights must be >= 0: {', '.join(bad)}.")
        if not sum(weights) > 0:
            raise UserError(f"sft.datasets weights sum to {sum(weights)}: at least one must be positive.")
        for n, size, w in zip(names, sizes, weights):
            if w > 0 and size == 0:
                raise UserError(f"sft dataset {n} has weight {w} but no records.")
        # Imported here: the retro package pulls in megatron-core, which recipe validation does not need.
        from retro_toolkit.collections.retro.blend import schedule

        self.names, self.sizes, self.seed = names, sizes, seed
        self.source, self.position = schedule(weights, num_samples)
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[int, int]:
        """(dataset index, record index) of sample i."""
        s = int(self.source[i])
        epoch, j = divmod(int(self.position[i]), self.sizes[s])
        key = (s, epoch)
        if key not in self._perms:
            if len(self._perms) > 64:
                self._perms.clear()
            self._perms[key] = np.random.default_rng([self.seed, s, epoch]).permutation(self.sizes[s])
        return s, int(self._perms[key][j])
