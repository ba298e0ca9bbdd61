"""Solvent molecules, liquid structure, capillary glasses and incoherent scattering on a Q grid (electron units)."""

from __future__ import annotations

import functools

import numpy as np

from .errors import InputError, bad
from .scattering import _xraydb, check_element, check_q, f0

# ---------------------------------------------------------------------------------------------------------------
# Molecule geometries (Angstrom, hydrogens included), built from gas-phase bond lengths and angles.
# ---------------------------------------------------------------------------------------------------------------
TETRAHEDRAL_DEG = 109.4712


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def _frame(u, ref):
    """Two unit vectors perpendicular to u (and to each other), the first as close to `ref` as possible."""
    e1 = np.asarray(ref, dtype=np.float64) - np.dot(ref, u) * u
    if np.linalg.norm(e1) < 1e-8:
        e1 = np.cross(u, [1.0, 0.0, 0.0]) if abs(u[0]) < 0.9 else np.cross(u, [0.0, 1.0, 0.0])
    e1 = _unit(e1)
    return e1, np.cross(u, e1)


def _methyl(c, neighbour, ref, d_ch: float = 1.09) -> list[np.ndarray]:
    """Three staggered methyl hydrogens on carbon c bonded to `neighbour` (C-C-H tetrahedral); one H towards ref."""
    u = _unit(np.asarray(c) - np.asarray(neighbour))
    e1, e2 = _frame(u, ref)
    t = np.deg2rad(180.0 - TETRAHEDRAL_DEG)
    return [np.asarray(c) + d_ch * (np.cos(t) * u + np.sin(t) * (np.cos(p) * e1 + np.sin(p) * e2))
            for p in np.deg2rad([0.0, 120.0, 240.0])]


def _methylene(c, a, b, d_ch: float = 1.09, hch_deg: float = 107.0) -> list[np.ndarray]:
    """Two methylene hydrogens on carbon c bonded to a and b, in the plane perpendicular to a-c-b."""
    bis = _unit((np.asarray(c) - a) + (np.asarray(c) - b))
    n = _unit(np.cross(np.asarray(a) - c, np.asarray(b) - c))
    h = np.deg2rad(hch_deg) / 2.0
    return [np.asarray(c) + d_ch * (np.cos(h) * bis + s * np.sin(h) * n) for s in (1.0, -1.0)]


def n_alkane(n_carbon: int, d_cc: float = 1.53, ccc_deg: float = 112.0) -> tuple[list[str], np.ndarray]:
    """All-trans n-alkane CnH(2n+2): C-C 1.53 A, C-C-C 112 deg, C-H 1.09 A (gas-phase electron diffraction values,
    e.g. Bonham, Bartell & Kohl, J. Am. Chem. Soc. 81, 4765 (1959) for n-butane)."""
    if n_carbon < 2:
        raise bad("n_carbon", n_carbon, "at least 2 carbons")
    half = np.deg2rad(ccc_deg) / 2.0
    cs = [np.array([k * d_cc * np.sin(half), (k % 2) * d_cc * np.cos(half), 0.0]) for k in range(n_carbon)]
    hs: list[np.ndarray] = []
    hs += _methyl(cs[0], cs[1], ref=cs[0] - cs[1] + np.array([0.0, -1.0, 0.0]))
    for k in range(1, n_carbon - 1):
        hs += _methylene(cs[k], cs[k - 1], cs[k + 1])
    hs += _methyl(cs[-1], cs[-2], ref=np.array([0.0, 1.0 if n_carbon % 2 else -1.0, 0.0]))
    return ["C"] * n_carbon + ["H"] * len(hs), np.array(cs + hs)


def toluene() -> tuple[list[str], np.ndarray]:
    """C7H8: aromatic C-C 1.399 A, C-CH3 1.511 A (gas electron diffraction, Seip et al., J. Mol. Struct. 1977,
    'vapour phase toluene'), aromatic C-H 1.08 A, methyl C-H 1.10 A."""
    r_ring, d_ch, d_cm = 1.399, 1.08, 1.511
    ang = np.deg2rad(60.0 * np.arange(6))
    ring = [np.array([r_ring * np.cos(a), r_ring * np.sin(a), 0.0]) for a in ang]
    hs = [np.array([(r_ring + d_ch) * np.cos(a), (r_ring + d_ch) * np.sin(a), 0.0]) for a in ang[1:]]
    cm = np.array([r_ring + d_cm, 0.0, 0.0])
    hs += _methyl(cm, ring[0], ref=np.array([0.0, 0.0, 1.0]), d_ch=1.10)
    return ["C"] * 7 + ["H"] * 8, np.array(ring + [cm] + hs)


def chloroform() -> tuple[list[str], np.ndarray]:
    """CHCl3 (C3v): C-Cl 1.758 A, C-H 1.08 A, Cl-C-Cl 111.3 deg (gas-phase microwave structure,
    Jen & Lide, J. Chem. Phys. 36, 2525 (1962))."""
    d_ccl, d_ch, clccl = 1.758, 1.08, np.deg2rad(111.3)
    # angle t between C-H (z) and each C-Cl: cos(ClCCl) = cos^2 t + sin^2 t cos 120  ->  cos^2 t = (1 + 2 cos a) / 3
    t = np.pi - np.arccos(np.sqrt((1.0 + 2.0 * np.cos(clccl)) / 3.0))
    cls = [d_ccl * np.array([np.sin(t) * np.cos(p), np.sin(t) * np.sin(p), np.cos(t)])
           for p in np.deg2rad([0.0, 120.0, 240.0])]
    return ["C", "H", "Cl", "Cl", "Cl"], np.array([np.zeros(3), np.array([0.0, 0.0, d_ch])] + cls)


def water() -> tuple[list[str], np.ndarray]:
    """H2O: O-H 0.9572 A, H-O-H 104.52 deg (Benedict, Gailar & Plyler, J. Chem. Phys. 24, 1139 (1956))."""
    d, h = 0.9572, np.deg2rad(104.52) / 2.0
    return ["O", "H", "H"], np.array([[0.0, 0.0, 0.0], [d * np.sin(h), d * np.cos(h), 0.0],
                                      [-d * np.sin(h), d * np.cos(h), 0.0]])


MOLECULES = {
    "toluene": toluene,
    "hexane": lambda: n_alkane(6),
    "octane": lambda: n_alkane(8),
    "chloroform": chloroform,
    "water": water,
}

# First sharp (principal) peak of the liquid's X-ray scattering, Q in 1/A, and the source for each position.
FIRST_PEAK_INV_ANGSTROM = {
    # toluene: measured at lambda = 0.564 A in the reference work's supplementary data (1.28 1/A, see
    # /work/shared/notes/physics.md); the X-ray study of liquid benzene derivatives by Katayama & Ozutsumi
    # ("Liquid structure of benzene and its derivatives as studied by means of X-ray scattering") shows the main
    # maximum of toluene at about 1.3 1/A. We place it at 1.30.
    "toluene": 1.30,
    # n-hexane: 1.41 1/A in the reference work's measured hexane; liquid n-alkanes C6-C16 by Mo K-alpha X-ray
    # diffraction (Bochynski & Drozdowski, Acta Phys. Pol. A 88, 1089 (1995)) have their main maximum near 1.4 1/A.
    "hexane": 1.41,
    # n-octane: same alkane series (Bochynski & Drozdowski 1995; Habenschuss & Narten, J. Chem. Phys. 92, 5692
    # (1990), X-ray diffraction of liquid n-alkanes): main maximum near 1.40 1/A.
    "octane": 1.40,
    # chloroform: principal X-ray peak near 1.3 1/A (Pothoczki, Temleitner & Pusztai, Chem. Rev. 115, 13308 (2015),
    # review of liquids of (nearly) tetrahedral molecules incl. CHCl3).
    "chloroform": 1.30,
    # water: principal X-ray peak at 2.0 1/A (Hura, Sorenson, Glaeser & Head-Gordon, J. Chem. Phys. 113, 9140 (2000);
    # Skinner et al., J. Chem. Phys. 138, 074506 (2013)).
    "water": 2.00,
}

# Packing fraction of the united-atom hard-sphere structure factor (Percus-Yevick) used for each liquid.
PACKING_FRACTION = {"toluene": 0.45, "hexane": 0.45, "octane": 0.45, "chloroform": 0.45, "water": 0.42}

SOLVENTS = tuple(MOLECULES)


def check_solvent(name: str, field: str = "solvent") -> str:
    n = str(name).strip().lower()
    if n not in MOLECULES:
        raise bad(field, name, f"one of {', '.join(SOLVENTS)}")
    return n


def molecule(name: str) -> tuple[list[str], np.ndarray]:
    """Elements and positions (Angstrom) of a built-in solvent molecule."""
    return MOLECULES[check_solvent(name)]()


# ---------------------------------------------------------------------------------------------------------------
# Incoherent (Compton) scattering function
# ---------------------------------------------------------------------------------------------------------------
def atomic_number(element: str) -> int:
    return int(_xraydb().atomic_number(check_element(element)))


def incoherent_s(element: str, q_inv_angstrom) -> np.ndarray:
    """Incoherent scattering function S(Q) in electrons per atom.

    xraydb has no incoherent scattering function (only energy-dependent cross sections), so we use the
    independent-electron (Waller-Hartree) form S = Z - sum_j |f_jj|^2 - sum_{j!=k} |f_jk|^2 (Waller & Hartree,
    Proc. R. Soc. A 124, 119 (1929)) with the exchange sum dropped and every electron given the atom's mean form
    factor f0/Z: S(Q) = Z - f0(Q)^2 / Z. It is exact for one-electron atoms (H), has the right limits S(0) = 0 and
    S(inf) = Z, and by Cauchy-Schwarz is an upper bound of the Waller-Hartree value (heavy atoms: ~10-20 % high at
    mid Q, which the sampled Compton strength covers). Breit-Dirac recoil and monochromator/detector energy
    discrimination only scale it further; the augmentation samples that scale.
    """
    z = atomic_number(element)
    f = f0(element, q_inv_angstrom)
    return z - f * f / z


def composition_counts(composition) -> dict[str, float]:
    """{element: atoms per formula unit} from a mapping, validated."""
    if not isinstance(composition, dict) or not composition:
        raise bad("elements", composition, "a mapping {element: atoms per formula unit}, e.g. {Pb: 1, S: 1}")
    out = {}
    for k, v in composition.items():
        try:
            el = check_element(k)
        except InputError:
            raise bad(f"elements.{k}", k, "a chemical element symbol such as Pb or S") from None
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise bad(f"elements.{k}", v, "a positive number of atoms per formula unit") from None
        if not np.isfinite(v) or v <= 0:
            raise bad(f"elements.{k}", v, "a positive number of atoms per formula unit")
        out[el] = out.get(el, 0.0) + v
    return out


def mean_square_form_factor(composition, q_inv_angstrom) -> np.ndarray:
    """<f0^2>(Q) per atom of a composition: the self-scattering floor of the coherent pattern."""
    comp = composition_counts(composition)
    n = sum(comp.values())
    return sum(c * f0(el, q_inv_angstrom) ** 2 for el, c in comp.items()) / n


def mean_incoherent(composition, q_inv_angstrom) -> np.ndarray:
    """Incoherent S(Q) per atom of a composition (electron units)."""
    comp = composition_counts(composition)
    n = sum(comp.values())
    return sum(c * incoherent_s(el, q_inv_angstrom) for el, c in comp.items()) / n


# ---------------------------------------------------------------------------------------------------------------
# Liquid: intramolecular DSE + united-atom site-site intermolecular term with a Percus-Yevick S(Q)
# ---------------------------------------------------------------------------------------------------------------
def percus_yevick_s(q_inv_angstrom, diameter_angstrom: float, packing_fraction: float) -> np.ndarray:
    """Hard-sphere structure factor in the Percus-Yevick closure (Wertheim, Phys. Rev. Lett. 10, 321 (1963);
    closed form as in Kinning & Thomas, Macromolecules 17, 1712 (1984))."""
    eta = float(packing_fraction)
    a = np.asarray(q_inv_angstrom, dtype=np.float64) * diameter_angstrom
    alpha = (1 + 2 * eta) ** 2 / (1 - eta) ** 4
    beta = -6 * eta * (1 + eta / 2) ** 2 / (1 - eta) ** 4
    gamma = eta * alpha / 2
    s0 = (1 - eta) ** 4 / (1 + 2 * eta) ** 2
    small = a < 0.2  # the closed form cancels badly at small Q sigma; S is flat there (S(0) = s0 + O(A^2))
    x = np.where(small, 1.0, a)
    sx, cx = np.sin(x), np.cos(x)
    g = (alpha * (sx - x * cx) / x**2
         + beta * (2 * x * sx + (2 - x**2) * cx - 2) / x**3
         + gamma * (-x**4 * cx + 4 * ((3 * x**2 - 6) * cx + (x**3 - 6 * x) * sx + 6)) / x**5)
    s = 1.0 / (1.0 + 24.0 * eta * g / x)
    return np.where(small, s0, s)


def intramolecular_intensity(elements, positions_angstrom, q_inv_angstrom) -> np.ndarray:
    """Orientation-averaged DSE of one molecule, sum_ij f_i f_j sinc(Q r_ij) (self terms included), electrons^2."""
    q = np.asarray(q_inv_angstrom, dtype=np.float64)
    pos = np.asarray(positions_angstrom, dtype=np.float64)
    ff = {e: f0(e, q) for e in set(elements)}
    f = np.array([ff[e] for e in elements])  # (n_atoms, n_q)
    r = np.linalg.norm(pos[:, None, :] - pos[None, :, :], axis=-1)
    out = np.sum(f * f, axis=0)
    i, j = np.triu_indices(len(pos), k=1)
    for a, b in zip(i, j):
        out += 2.0 * f[a] * f[b] * np.sinc(q * r[a, b] / np.pi)
    return out


def _liquid_parts(name: str, q: np.ndarray):
    """Self, distinct intramolecular, Compton, united-atom form factor and site count of a solvent on q."""
    els, pos = molecule(name)
    self_ = sum(f0(e, q) ** 2 for e in els)
    distinct = intramolecular_intensity(els, pos, q) - self_
    incoh = sum(incoherent_s(e, q) for e in els)
    heavy = [e for e in els if e != "H"]
    f_site = (sum(f0(e, q) for e in heavy) + els.count("H") * f0("H", q)) / len(heavy)
    return self_, distinct, incoh, f_site, len(heavy)


def _taper(q, first_peak):
    """Low-Q suppression of the distinct scattering: in a liquid the intermolecular correlations cancel the
    intramolecular ones as Q -> 0, leaving I(0) ~ compressibility (a few % of the forward value)."""
    return 1.0 - 0.95 * np.exp(-((q / (0.75 * first_peak)) ** 4))


def _liquid(name, q, diameter, parts=None):
    self_, distinct, incoh, f_site, n_site = parts if parts is not None else _liquid_parts(name, q)
    inter = n_site * f_site**2 * (percus_yevick_s(q, diameter, PACKING_FRACTION[name]) - 1.0)
    return self_ + incoh + (distinct + inter) * _taper(q, FIRST_PEAK_INV_ANGSTROM[name])


_FIT_Q = np.arange(0.3, 4.0 + 1e-9, 0.001)
_FIT_WINDOW = (0.6, 3.5)


@functools.lru_cache(maxsize=None)
def site_diameter_angstrom(name: str) -> float:
    """Hard-sphere site diameter whose liquid curve peaks at the documented first-peak position (bisection)."""
    name = check_solvent(name)
    target = FIRST_PEAK_INV_ANGSTROM[name]
    win = (_FIT_Q >= _FIT_WINDOW[0]) & (_FIT_Q <= _FIT_WINDOW[1])
    parts = _liquid_parts(name, _FIT_Q)

    def peak(d):
        tot = _liquid(name, _FIT_Q, d, parts)
        return _FIT_Q[win][np.argmax(tot[win])]

    lo, hi = 3.0, 7.0  # the peak moves monotonically to lower Q as the diameter grows in this bracket
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if peak(mid) > target:
            lo = mid
        else:
            hi = mid
    d = 0.5 * (lo + hi)
    if abs(peak(d) - target) > 0.01:
        raise InputError(f"solvent = {name!r}: could not place the liquid peak at {target} 1/A "
                         f"(got {peak(d):.3f}); expected a fit within 0.01 1/A")
    return d


def solvent_intensity(name: str, q_inv_angstrom) -> np.ndarray:
    """X-ray intensity of the liquid per molecule in electron units.

    Self scattering + Compton + (intramolecular distinct DSE of the built-in molecule + intermolecular term) x a
    low-Q taper. The intermolecular term is the simplest site-site (RISM-like, Chandler & Andersen, J. Chem. Phys.
    57, 1930 (1972)) form: united atoms (heavy atom + its hydrogens) on a Percus-Yevick hard-sphere S(Q), with the
    site diameter fitted so that the curve's first peak sits at FIRST_PEAK_INV_ANGSTROM (the centre-of-mass
    decoupling approximation fails here: for chains the molecular amplitude dies before the interchain peak).
    """
    name = check_solvent(name)
    q = check_q(q_inv_angstrom)
    return np.maximum(_liquid(name, q, site_diameter_angstrom(name)), 0.0)

# ---------------------------------------------------------------------------------------------------------------
# Sample holders: amorphous capillary walls
# ---------------------------------------------------------------------------------------------------------------
def _oxide_atoms(mass_fractions: dict[str, float]) -> dict[str, float]:
    """Atoms per 100 g of a glass from oxide mass fractions (e.g. {'SiO2': 80.6, ...})."""
    xdb = _xraydb()
    oxides = {"SiO2": {"Si": 1, "O": 2}, "B2O3": {"B": 2, "O": 3}, "Na2O": {"Na": 2, "O": 1},
              "Al2O3": {"Al": 2, "O": 3}}
    atoms: dict[str, float] = {}
    for ox, w in mass_fractions.items():
        comp = oxides[ox]
        m = sum(n * xdb.atomic_mass(e) for e, n in comp.items())
        for e, n in comp.items():
            atoms[e] = atoms.get(e, 0.0) + w / m * n
    return atoms


# Each holder: composition and amorphous maxima (Q 1/A, relative height, FWHM 1/A) of its structure factor.
CAPILLARIES = {
    # Borosilicate (Corning 7740 / Pyrex-type, oxide wt% SiO2 80.6, B2O3 13.0, Na2O 4.0, Al2O3 2.3 per the maker's
    # data sheet). Silica-like network: first sharp diffraction peak near 1.5-1.6 1/A, then maxima near 2.9, 5.3
    # and 8.0 1/A (vitreous silica: Mozzi & Warren, J. Appl. Cryst. 2, 164 (1969); borosilicate glasses keep the
    # FSDP at ~1.55-1.65 1/A).
    "borosilicate": (_oxide_atoms({"SiO2": 80.6, "B2O3": 13.0, "Na2O": 4.0, "Al2O3": 2.3}),
                     [(1.58, 1.1, 0.55), (2.95, 0.25, 0.8), (5.3, 0.3, 1.0), (8.0, 0.12, 1.3)]),
    # Kapton (PMDA-ODA polyimide, C22H10N2O5): weak chain-repeat maximum at low Q (d ~ 15-16 A, Q ~ 0.4 1/A) and
    # the broad amorphous halo near 1.2-1.3 1/A (interchain packing, d ~ 4.8-5 A), with a weaker one near
    # 2.1 1/A (Takahashi, Yoon & Parrish, Macromolecules 17, 2583 (1984), WAXS of PMDA-ODA; positions as in
    # /work/shared/notes/physics.md: 'broad features at low Q and near 1.2 1/A').
    "kapton": ({"C": 22, "H": 10, "N": 2, "O": 5},
               [(0.40, 0.5, 0.12), (1.25, 1.2, 0.6), (2.1, 0.25, 0.7), (3.1, 0.1, 1.0)]),
}

CAPILLARY_FIRST_PEAK_INV_ANGSTROM = {"borosilicate": 1.58, "kapton": 1.25}


def check_capillary(name: str, field: str = "capillary") -> str:
    n = str(name).strip().lower()
    if n not in CAPILLARIES:
        raise bad(field, name, f"one of {', '.join(CAPILLARIES)}")
    return n


def capillary_intensity(material: str, q_inv_angstrom) -> np.ndarray:
    """Amorphous holder scattering per atom (electron units): <f^2> + S_inc + <f>^2 (S(Q) - 1), with S(Q) built
    from the documented maxima and falling to S(0) ~ 0.05 below the first one."""
    material = check_capillary(material)
    q = check_q(q_inv_angstrom)
    comp, peaks = CAPILLARIES[material]
    n = sum(comp.values())
    f_mean = sum(c * f0(e, q) for e, c in comp.items()) / n
    hump = sum(a * np.exp(-4 * np.log(2) * (q - q0) ** 2 / w**2) for q0, a, w in peaks)
    q_first = min(p[0] for p in peaks if p[1] >= 1.0)
    low = np.exp(-((q / (0.8 * q_first)) ** 4))  # depletion below the first peak (incompressible solid)
    s = 1.0 + hump - 0.95 * low
    return np.maximum(mean_square_form_factor(comp, q) + mean_incoherent(comp, q) + f_mean**2 * (s - 1.0), 0.0)
