"""Nanocrystal clusters cut from a crystal: shapes, surfaces, centring, equal-volume diameters and size ladders."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
from scipy.spatial import cKDTree

from .crystal import Crystal
from .errors import InputError, bad
from .scattering import check_element

SQRT3 = np.sqrt(3.0)
# facet_ratio = distance of the {111} facets from the centre / distance of the {100} facets
FACET_RATIO = {"cube": np.inf, "cuboctahedron": 2.0 / SQRT3, "truncated_octahedron": SQRT3 / 2.0,
               "octahedron": 1.0 / SQRT3}
SHAPES = ("sphere", "cube", "cuboctahedron", "truncated_octahedron", "octahedron", "polyhedron")
# A polyhedron of any truncation can be named with its facet ratio, "polyhedron:0.7" (see `parse_shape`): the
# rock-salt Wulff shapes run from the octahedron (0.577) through the truncated octahedron (0.866) and the
# cuboctahedron (1.155) to the cube (infinite).
SURFACES = ("as_cut", "stoichiometric", "cation_rich")
CENTRES = ("atom", "random")


@dataclass
class Cluster:
    """Atoms of one particle: element symbols and Cartesian positions in Angstrom (ASE-like, plain arrays).

    Clusters cut from a lattice also carry integer coordinates on the crystal's site grid, which the exact
    lattice engine needs; clusters read from coordinates (xyz) do not.
    """

    elements: np.ndarray  # (n,) element symbols
    positions_angstrom: np.ndarray  # (n, 3)
    grid_index: np.ndarray | None = None  # (n, 3) integers on the site grid
    grid_vectors_angstrom: np.ndarray | None = None  # (3, 3) rows: a/n1, b/n2, c/n3
    volume_per_atom_angstrom3: float | None = None
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        self.elements = np.asarray(self.elements, dtype=object)
        self.positions_angstrom = np.asarray(self.positions_angstrom, dtype=np.float64).reshape(-1, 3)
        if len(self.elements) != len(self.positions_angstrom):
            raise InputError("elements and positions_angstrom: expected the same number of atoms")

    def __len__(self) -> int:
        return len(self.elements)

    @property
    def n_atoms(self) -> int:
        return len(self.elements)

    @property
    def species(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.elements.tolist()))

    def counts(self) -> dict[str, int]:
        return {e: int(np.sum(self.elements == e)) for e in self.species}

    @property
    def diameter_nm(self) -> float:
        """Diameter of the sphere of equal volume: atom count x volume per atom of the bulk crystal."""
        if self.volume_per_atom_angstrom3 is None:
            return float("nan")
        return equal_volume_diameter_nm(self.n_atoms, self.volume_per_atom_angstrom3)

    @property
    def on_grid(self) -> bool:
        return self.grid_index is not None and self.grid_vectors_angstrom is not None


def equal_volume_diameter_nm(n_atoms: int, volume_per_atom_angstrom3: float) -> float:
    return float((6.0 * n_atoms * volume_per_atom_angstrom3 / np.pi) ** (1.0 / 3.0) / 10.0)


def atoms_for_diameter(diameter_nm: float, volume_per_atom_angstrom3: float) -> float:
    return float(np.pi * (diameter_nm * 10.0) ** 3 / 6.0 / volume_per_atom_angstrom3)


def parse_shape(shape: str, facet_ratio: float | None = None) -> tuple[str, float | None]:
    """(shape, facet_ratio) of a shape name, checked: one of SHAPES, where "polyhedron:RHO" names a polyhedron with
    d111/d100 = RHO and a polyhedron needs RHO >= 1/sqrt(3)."""
    if isinstance(shape, str) and shape.startswith("polyhedron:"):
        text = shape.split(":", 1)[1]
        try:
            rho = float(text)
        except ValueError:
            raise bad("shape", shape, "polyhedron:RHO with RHO = d111/d100 a number >= 0.577") from None
        if facet_ratio is not None and facet_ratio != rho:
            raise bad("facet_ratio", facet_ratio, f"none, or the {rho} that shape {shape!r} names")
        shape, facet_ratio = "polyhedron", rho
    if shape not in SHAPES:
        raise bad("shape", shape, f"one of {list(SHAPES)}")
    if shape == "polyhedron" and (facet_ratio is None or not facet_ratio >= 1 / SQRT3 - 1e-12):
        raise bad("facet_ratio", facet_ratio, "d111/d100 >= 1/sqrt(3) = 0.577 (the octahedron limit)")
    return shape, facet_ratio


def gauge(shape: str, xyz: np.ndarray, facet_ratio: float | None = None) -> np.ndarray:
    """Scale at which each point (relative to the centre, Angstrom) enters the shape: inside iff gauge <= s."""
    shape, facet_ratio = parse_shape(shape, facet_ratio)
    if shape == "sphere":
        return np.sqrt(np.einsum("ij,ij->i", xyz, xyz))
    rho = FACET_RATIO.get(shape, facet_ratio)
    ax = np.abs(xyz)
    g100 = ax.max(axis=1)
    if not np.isfinite(rho):
        return g100
    return np.maximum(g100, ax.sum(axis=1) / (SQRT3 * rho))


@functools.lru_cache(maxsize=None)
def _half_extent_per_diameter(shape: str, facet_ratio: float | None = None) -> float:
    """Largest |x|, |y| or |z| of a shape per unit equal-volume diameter (the cube of candidate sites must hold it):
    0.5 for a sphere, 0.40 for a cube, 0.73 for an octahedron. The volume at unit gauge is counted on a grid."""
    shape, facet_ratio = parse_shape(shape, facet_ratio)
    if shape == "sphere":
        return 0.5
    n = 96
    u = (np.arange(n) + 0.5) / n * 2.0 - 1.0  # midpoints of [-1, 1]; every shape at gauge 1 lies inside (g100 <= 1)
    xyz = np.stack(np.meshgrid(u, u, u, indexing="ij"), -1).reshape(-1, 3)
    volume = 8.0 * np.mean(gauge(shape, xyz, facet_ratio) <= 1.0)
    rho = FACET_RATIO.get(shape, facet_ratio)
    axis = min(1.0, SQRT3 * rho)  # where the x axis leaves the shape at gauge 1
    return axis / np.cbrt(6.0 * volume / np.pi)


def _candidates(crystal: Crystal, centre_cart: np.ndarray, half_width: float):
    """Lattice sites within a cube of half-width around the centre, with their grid coordinates."""
    lat = crystal.lattice_angstrom
    inv = np.linalg.inv(lat)
    corners = centre_cart + half_width * np.array([[i, j, k] for i in (-1, 1) for j in (-1, 1) for k in (-1, 1)])
    fc = corners @ inv
    lo = np.floor(fc.min(axis=0)).astype(int) - 1
    hi = np.ceil(fc.max(axis=0)).astype(int) + 1
    cells = np.stack(np.meshgrid(*[np.arange(l, h + 1) for l, h in zip(lo, hi)], indexing="ij"), -1).reshape(-1, 3)
    frac = (cells[:, None, :] + crystal.sites_frac[None, :, :]).reshape(-1, 3)
    site = np.tile(np.arange(len(crystal.sites_frac)), len(cells))
    xyz = frac @ lat
    keep = np.all(np.abs(xyz - centre_cart) <= half_width, axis=1)
    div = crystal.grid_divisions()
    grid = None
    if div is not None:
        grid = np.rint(frac[keep] * np.array(div)).astype(np.int64)
    return xyz[keep], site[keep], grid, div


def _coordination(xyz: np.ndarray, is_other: np.ndarray, bond_angstrom: float) -> np.ndarray:
    """Number of neighbours of the other species within the bond length, per atom."""
    tree = cKDTree(xyz)
    pairs = tree.query_pairs(bond_angstrom * 1.05, output_type="ndarray")
    coord = np.zeros(len(xyz), dtype=np.int64)
    if len(pairs):
        unlike = is_other[pairs[:, 0]] != is_other[pairs[:, 1]]
        p = pairs[unlike]
        np.add.at(coord, p[:, 0], 1)
        np.add.at(coord, p[:, 1], 1)
    return coord


def _nearest_unlike_distance(crystal: Crystal) -> float:
    xyz, site, _, _ = _candidates(crystal, np.zeros(3), 1.5 * np.abs(crystal.lattice_angstrom).max())
    els = np.array(crystal.site_elements)[site]
    a = xyz[els == crystal.species[0]]
    b = xyz[els != crystal.species[0]]
    if len(b) == 0:
        return float(np.min(cKDTree(a).query(a, k=2)[0][:, 1]))
    return float(np.min(cKDTree(b).query(a)[0]))


def _surface(elements, xyz, crystal: Crystal, surface: str, anion_removal: float, rng) -> np.ndarray:
    """Boolean mask of atoms kept after applying the surface model."""
    keep = np.ones(len(elements), dtype=bool)
    if surface == "as_cut" or len(crystal.species) < 2:
        return keep
    cation, anion = crystal.species[0], crystal.species[-1]
    bond = _nearest_unlike_distance(crystal)
    is_anion = elements == anion
    coord = _coordination(xyz, elements == cation, bond)
    bulk = coord.max() if len(coord) else 0
    noise = rng.random(len(elements))  # random tie-breaking among equally coordinated atoms
    if surface == "cation_rich":
        under = np.flatnonzero(is_anion & (coord < bulk))
        n_remove = int(round(anion_removal * len(under)))
        if n_remove:
            keep[rng.choice(under, size=n_remove, replace=False)] = False
        return keep
    # stoichiometric: remove the excess of each species, least-coordinated first
    counts = {e: int(np.sum(elements == e)) for e in crystal.species}
    units = min(counts[e] // crystal.formula_ratio[e] for e in crystal.species)
    for e in crystal.species:
        excess = counts[e] - units * crystal.formula_ratio[e]
        if excess > 0:
            idx = np.flatnonzero(elements == e)
            order = np.lexsort((noise[idx], coord[idx]))
            keep[idx[order[:excess]]] = False
    return keep


def _centre(crystal: Crystal, centre: str, rng) -> np.ndarray:
    origin = crystal.sites_frac[crystal.centre_site]
    if centre == "atom":
        return origin @ crystal.lattice_angstrom
    if centre == "random":
        return (origin + rng.random(3)) @ crystal.lattice_angstrom
    raise bad("centre", centre, f"one of {list(CENTRES)}")


def _check_common(surface, anion_removal):
    if surface not in SURFACES:
        raise bad("surface", surface, f"one of {list(SURFACES)}")
    if not (0.0 <= anion_removal <= 1.0):
        raise bad("anion_removal", anion_removal, "a fraction between 0 and 1")


def cut_ladder(crystal: Crystal, shape: str, diameters_nm, *, surface: str = "as_cut",
               anion_removal: float = 0.5, centre: str = "atom", facet_ratio: float | None = None,
               seed: int = 0) -> list[Cluster]:
    """Clusters of one shape and centre whose equal-volume diameters are closest to the requested ones.

    Shapes grow by whole shells (all sites at equal gauge enter together), so each requested diameter is met
    by the nearest complete-shell cluster; duplicates are dropped. Surfaces are applied to each member with a
    generator seeded from `seed`, so a ladder is reproducible.
    """
    name = shape
    shape, facet_ratio = parse_shape(shape, facet_ratio)
    d = np.atleast_1d(np.asarray(diameters_nm, dtype=np.float64))
    if d.size == 0 or np.any(~np.isfinite(d)) or np.any(d <= 0):
        raise bad("diameter_nm", d.tolist() if d.size > 1 else (d.tolist() or [None])[0], "positive diameters in nm")
    _check_common(surface, anion_removal)
    rng = np.random.default_rng(seed)
    centre_cart = _centre(crystal, centre, rng)
    extent = 1.05 * _half_extent_per_diameter(shape, facet_ratio)  # 5 % over the grid-counted volume's error
    half = max(0.55, extent) * d.max() * 10.0 + 2.0 * np.abs(crystal.lattice_angstrom).max()
    xyz, site, grid, div = _candidates(crystal, centre_cart, half)
    rel = xyz - centre_cart
    g = gauge(shape, rel, facet_ratio)
    order = np.argsort(g, kind="stable")
    gs = g[order]
    # shell closures: last index of each run of equal gauge
    new_shell = np.flatnonzero(np.diff(gs) > 1e-6 * max(gs[-1], 1.0))
    ends = np.append(new_shell + 1, len(gs))  # cumulative atom counts at each closure
    v_atom = crystal.volume_per_atom_angstrom3
    limit = half - 1e-6  # a shell is only complete if the whole shape lies inside the candidate box
    out: list[Cluster] = []
    seen = set()
    elements_all = np.array(crystal.site_elements, dtype=object)[site]
    for dk in np.sort(d):
        target = atoms_for_diameter(dk, v_atom)
        j = int(np.argmin(np.abs(ends - target)))
        n = int(ends[j])
        if gs[n - 1] > limit:
            raise InputError(f"diameter_nm = {dk}: internal candidate box too small")
        if n in seen:
            continue
        seen.add(n)
        idx = order[:n]
        els = elements_all[idx]
        keep = _surface(els, xyz[idx], crystal, surface, anion_removal, np.random.default_rng([seed, n]))
        idx = idx[keep]
        gv = None if grid is None else crystal.lattice_angstrom / np.array(div)[:, None]
        out.append(Cluster(elements_all[idx], xyz[idx] - centre_cart,
                           None if grid is None else grid[idx], gv, v_atom,
                           {"material": crystal.name, "shape": name, "surface": surface, "centre": centre,
                            "anion_removal": anion_removal if surface == "cation_rich" else 0.0,
                            "facet_ratio": None if shape == "sphere" else float(FACET_RATIO.get(shape, facet_ratio)),
                            "gauge_angstrom": float(gs[n - 1]), "seed": seed}))
    return out


def cut(crystal: Crystal, shape: str, diameter_nm: float, **kwargs) -> Cluster:
    """One cluster whose equal-volume diameter is closest to `diameter_nm` (see `cut_ladder`)."""
    if not np.isfinite(diameter_nm) or diameter_nm <= 0:
        raise bad("diameter_nm", diameter_nm, "a positive diameter in nm")
    return cut_ladder(crystal, shape, [diameter_nm], **kwargs)[0]


def ladder_diameters(d_min_nm: float, d_max_nm: float, n: int) -> np.ndarray:
    """Geometrically spaced target diameters (equal relative steps) from d_min to d_max inclusive."""
    if not (0 < d_min_nm < d_max_nm):
        raise bad("d_max_nm", d_max_nm, f"a diameter above d_min_nm = {d_min_nm} > 0")
    if n < 2:
        raise bad("n_sizes", n, "at least 2 sizes")
    return np.geomspace(d_min_nm, d_max_nm, n)


def from_atoms(elements, positions_angstrom, info: dict | None = None) -> Cluster:
    """A cluster from arbitrary coordinates (relaxed, strained or read from a file): atomistic engine only."""
    els = np.array([check_element(e) for e in elements], dtype=object)
    pos = np.asarray(positions_angstrom, dtype=np.float64)
    if pos.ndim != 2 or pos.shape[1] != 3 or len(pos) != len(els):
        raise InputError(f"positions_angstrom: expected shape ({len(els)}, 3), got {pos.shape}")
    if not np.all(np.isfinite(pos)):
        raise InputError("positions_angstrom: expected finite coordinates")
    return Cluster(els, pos, info=dict(info or {}))
