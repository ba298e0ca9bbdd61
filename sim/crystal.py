"""Crystal structures: built-in PbS (rock salt) and CdSe (zinc blende), CIF import, and their site grids."""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

from .errors import InputError, bad
from .scattering import check_element

NON_METALS = frozenset("H He B C N O F Ne Si P S Cl Ar As Se Br Kr Te I Xe At Rn".split())
PBS_A_ANGSTROM = 5.936  # room-temperature bulk PbS (Fm-3m); COD 9008694 gives 5.9362
CDSE_ZB_A_ANGSTROM = 6.077  # zinc-blende CdSe (F-43m), room temperature


@dataclass(frozen=True)
class Crystal:
    """A periodic structure: lattice rows a, b, c in Angstrom and the sites of one cell in fractional coordinates."""

    name: str
    lattice_angstrom: np.ndarray  # (3, 3), rows are the cell vectors
    sites_frac: np.ndarray  # (n_sites, 3) in [0, 1)
    site_elements: tuple[str, ...]
    formula_ratio: dict = field(default_factory=dict)  # element -> atoms per formula unit

    def __post_init__(self):
        lat = np.asarray(self.lattice_angstrom, dtype=np.float64).reshape(3, 3)
        frac = np.mod(np.asarray(self.sites_frac, dtype=np.float64).reshape(-1, 3), 1.0)
        frac[np.isclose(frac, 1.0, atol=1e-9)] = 0.0
        if abs(np.linalg.det(lat)) < 1e-9:
            raise bad("lattice_angstrom", lat.tolist(), "three linearly independent cell vectors")
        if len(self.site_elements) != len(frac):
            raise InputError("site_elements: expected one element per site")
        els = tuple(check_element(e) for e in self.site_elements)
        object.__setattr__(self, "lattice_angstrom", lat)
        object.__setattr__(self, "sites_frac", frac)
        object.__setattr__(self, "site_elements", els)
        if not self.formula_ratio:
            counts = {e: els.count(e) for e in self.species}
            g = np.gcd.reduce(list(counts.values()))
            object.__setattr__(self, "formula_ratio", {e: c // g for e, c in counts.items()})

    @property
    def species(self) -> tuple[str, ...]:
        """Distinct elements, metals (cations) first, then in order of first appearance in the cell.

        The first species is the one an atom-centred cut is centred on, and the last is the anion whose
        under-coordinated atoms a cation-rich surface loses, whatever order a CIF file lists its sites in.
        """
        first = tuple(dict.fromkeys(self.site_elements))
        return tuple(sorted(first, key=lambda e: e in NON_METALS))

    @property
    def centre_site(self) -> int:
        """Index of the first site of the first species (the default cut centre)."""
        return self.site_elements.index(self.species[0])

    @property
    def cell_volume_angstrom3(self) -> float:
        return float(abs(np.linalg.det(self.lattice_angstrom)))

    @property
    def volume_per_atom_angstrom3(self) -> float:
        return self.cell_volume_angstrom3 / len(self.site_elements)

    def scaled(self, factor: float) -> "Crystal":
        """The same structure with every cell vector multiplied by `factor` (uniform strain 1 + eps)."""
        return Crystal(self.name, self.lattice_angstrom * factor, self.sites_frac, self.site_elements,
                       dict(self.formula_ratio))

    def grid_divisions(self, max_div: int = 48) -> tuple[int, int, int] | None:
        """Smallest (n1, n2, n3) such that every site lies on the grid a/n1, b/n2, c/n3; None if there is none."""
        out = []
        for axis in range(3):
            n = 1
            for x in self.sites_frac[:, axis]:
                den = Fraction(float(x)).limit_denominator(max_div).denominator
                if abs(float(Fraction(float(x)).limit_denominator(max_div)) - x) > 1e-6:
                    return None
                n = int(np.lcm(n, den))
            if n > max_div:
                return None
            out.append(n)
        return tuple(out)


def rock_salt(cation: str, anion: str, a_angstrom: float, name: str) -> Crystal:
    """Fm-3m rock salt with the cation at the origin (4 cations + 4 anions per conventional cell)."""
    fcc = np.array([[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]])
    return Crystal(name, np.eye(3) * a_angstrom, np.vstack([fcc, fcc + [0.5, 0, 0]]),
                   (cation,) * 4 + (anion,) * 4, {cation: 1, anion: 1})


def zinc_blende(cation: str, anion: str, a_angstrom: float, name: str) -> Crystal:
    """F-43m zinc blende with the cation at the origin and the anion at (1/4, 1/4, 1/4)."""
    fcc = np.array([[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]])
    return Crystal(name, np.eye(3) * a_angstrom, np.vstack([fcc, fcc + 0.25]),
                   (cation,) * 4 + (anion,) * 4, {cation: 1, anion: 1})


def pbs(a_angstrom: float = PBS_A_ANGSTROM) -> Crystal:
    """Lead sulfide, rock salt."""
    return rock_salt("Pb", "S", a_angstrom, "pbs")


def cdse(a_angstrom: float = CDSE_ZB_A_ANGSTROM) -> Crystal:
    """Cadmium selenide, zinc blende."""
    return zinc_blende("Cd", "Se", a_angstrom, "cdse")


BUILTIN = {"pbs": pbs, "cdse": cdse}


def material(name: str, a_angstrom: float | None = None) -> Crystal:
    """A built-in material by name (`pbs`, `cdse`), optionally with another lattice parameter."""
    key = str(name).lower()
    if key not in BUILTIN:
        raise bad("material", name, f"one of {sorted(BUILTIN)} (or a CIF file)")
    if a_angstrom is not None and (not np.isfinite(a_angstrom) or a_angstrom <= 0):
        raise bad("a_angstrom", a_angstrom, "a positive lattice parameter in Angstrom")
    return BUILTIN[key]() if a_angstrom is None else BUILTIN[key](a_angstrom)


def from_cif(path: str | Path) -> Crystal:
    """Read a small-molecule/inorganic CIF with gemmi and expand it to the full unit cell."""
    import gemmi

    p = Path(path)
    if not p.is_file():
        raise bad("cif", str(path), "an existing CIF file")
    try:
        st = gemmi.read_small_structure(str(p))
    except Exception as exc:  # gemmi raises RuntimeError/ValueError with its own text
        raise InputError(f"cif = {str(path)!r}: could not be read as CIF ({exc})") from None
    sites = st.get_all_unit_cell_sites()
    if not sites:
        raise InputError(f"cif = {str(path)!r}: expected atom sites, found none")
    lat = np.array([st.cell.orthogonalize(gemmi.Fractional(*e)).tolist() for e in np.eye(3)])
    frac = np.array([[s.fract.x, s.fract.y, s.fract.z] for s in sites])
    els = tuple(s.element.name for s in sites)
    if any(abs(s.occ - 1.0) > 1e-6 for s in sites):
        raise InputError(f"cif = {str(path)!r}: expected fully occupied sites (partial occupancies found)")
    return Crystal(st.name or p.stem, lat, frac, els)
