"""Free-text pathology reports for synthetic cases, in the style of OCR'd TCGA reports.

A report is one paragraph of section-headed sentences: de-identified header, specimen, history,
gross description, the diagnosis (a synonym of the case's subtype, in one of several phrase
families), grade, size, margins, nodes, sometimes a biomarker remark, sign-out boilerplate;
facts are dropped at random and OCR-like noise is added. The wording avoids the zero-shot prompt
families ("an H&E image of …", "a whole slide image showing …", "histopathology of …",
"… tissue.", "a microscopy slide of …", "this slide shows …"), so zero-shot evaluation is not
string matching against reports. Organ and procedure are drawn independently of the subtype,
so they are no shortcut to it.
"""

from __future__ import annotations

import numpy as np

# How often a report remarks on a biomarker: "pos" = P(positive remark | label 1), "neg" =
# P(negative remark | label 0); otherwise the report is silent about it. Named here so the
# retrieval oracles (examples/report_retrieval.py) model the generator, not a copy of it.
BIOMARKER_REMARK_RATES: dict[str, dict[str, float]] = {
    "bag": {"pos": 0.5, "neg": 0.2},
    "spatial": {"pos": 0.4, "neg": 0.3},
}

# Report synonyms per canonical subtype (the manifest's ``subtype`` strings).
SUBTYPE_REPORT_TERMS: dict[str, list[str]] = {
    "adenocarcinoma": [
        "adenocarcinoma",
        "adenocarcinoma, gland-forming",
        "invasive adenocarcinoma, acinar pattern",
        "gland-forming carcinoma",
        "adenocarcinoma with tubular/glandular architecture",
        "infiltrating adenocarcinoma",
    ],
    "small_cell": [
        "small cell carcinoma",
        "small cell neuroendocrine carcinoma",
        "high-grade neuroendocrine carcinoma, small cell type",
        "carcinoma, small cell type",
        "oat cell carcinoma",
        "poorly differentiated neuroendocrine carcinoma (small cell)",
    ],
    "spindle_cell": [
        "spindle cell neoplasm",
        "sarcomatoid carcinoma",
        "malignant spindle cell tumor",
        "spindle cell carcinoma",
        "sarcomatoid (spindle cell) carcinoma",
        "high-grade spindle cell malignancy",
    ],
    "papillary": [
        "papillary carcinoma",
        "papillary adenocarcinoma",
        "carcinoma with papillary architecture",
        "invasive papillary carcinoma",
        "malignant papillary neoplasm",
        "papillary-type carcinoma",
    ],
}

_ORGANS = [
    ("LUNG, RIGHT UPPER LOBE", "lobectomy"),
    ("LUNG, LEFT LOWER LOBE", "wedge resection"),
    ("COLON, SIGMOID", "segmental resection"),
    ("STOMACH, ANTRUM", "partial gastrectomy"),
    ("SOFT TISSUE, LEFT THIGH", "wide local excision"),
    ("KIDNEY, RIGHT", "radical nephrectomy"),
    ("BLADDER", "transurethral resection"),
    ("THYROID, LEFT LOBE", "hemithyroidectomy"),
    ("PANCREAS, HEAD", "pancreaticoduodenectomy"),
    ("ENDOMETRIUM", "total hysterectomy"),
]
_HEADERS = [
    "SURGICAL PATHOLOGY REPORT",
    "Report Type. Pathology. Record Status. Final",
    "FINAL PATHOLOGY REPORT",
    "PATHOLOGY CONSULTATION",
    "Anatomic Pathology Report",
]
_DEID = [
    "Patient Name: [REDACTED]",
    "MRN: [MRN]",
    "DOB: [DATE]",
    "Accession #: SP-[ID]",
    "Date of Procedure: [DATE]",
    "Physician: [NAME], MD",
    "Hospital: [INSTITUTION]",
]
# Diagnosis phrase families; {T} = subtype term, {O} = organ, {P} = procedure.
_DIAGNOSIS = [
    "FINAL DIAGNOSIS: {O}, {P}: - {T}",
    "DIAGNOSIS: {O} ({P}): {T}",
    "DIAGNOSIS. {O}, {P}. {TU}",
    "Histologic type: {T}",
    "Sections of the {o} demonstrate {T}",
    "Findings are diagnostic of {T}, {o}",
    "{O}, {P}: INVOLVED BY {TU}",
    "Microscopic examination reveals an infiltrating {T}",
    "Tumor type: {T} (see comment)",
    "Interpretation: {o}, {P} - consistent with {T}",
]
_GROSS = [
    "GROSS DESCRIPTION: Received in formalin labeled with the patient's identifiers and '{o}' is a {a} x {b} x {c} cm {p}. Sectioning reveals a {col}, {con} mass measuring {d} cm. Representative sections are submitted in cassettes A1-A{n}",
    "Gross: The specimen consists of a {a} x {b} x {c} cm portion of {o}. A {con} {col} lesion is identified, {d} cm in greatest extent. Submitted in {n} cassettes",
    "GROSS. One container, labeled '{o}', holds a {p} measuring {a} x {b} x {c} cm with a {col} cut surface. Lesion size {d} cm. Entirely submitted ({n} blocks)",
]
_COLOURS = ["tan-white", "gray-tan", "yellow-tan", "pink-tan", "white-gray"]
_CONSIST = ["firm", "friable", "rubbery", "ill-defined", "lobulated"]
_GRADES = {
    1: ["well differentiated", "G1", "low grade"],
    2: ["moderately differentiated", "G2", "intermediate grade"],
    3: ["poorly differentiated", "G3", "high grade"],
}


def _pick(rng: np.random.Generator, items: list[str]) -> str:
    return items[int(rng.integers(len(items)))]


def _noise(rng: np.random.Generator, text: str, rate: float) -> str:
    """OCR-like corruption of about ``rate`` of the words: swapped letters, broken words,
    look-alike characters, stray symbols."""
    confusions = {"l": "1", "O": "0", "o": "0", "e": "c", "m": "rn", "i": "l", "S": "5", "t": "f"}
    words = text.split(" ")
    for i, w in enumerate(words):
        if len(w) < 3 or rng.random() >= rate:
            continue
        op = int(rng.integers(4))
        j = int(rng.integers(1, len(w) - 1))
        if op == 0:  # adjacent transposition
            w = w[: j - 1] + w[j] + w[j - 1] + w[j + 1 :]
        elif op == 1:  # word broken by a line wrap
            w = w[:j] + ". " + w[j:]
        elif op == 2:  # look-alike character
            hits = [k for k, ch in enumerate(w) if ch in confusions]
            if hits:
                k = hits[int(rng.integers(len(hits)))]
                w = w[:k] + confusions[w[k]] + w[k + 1 :]
        else:  # stray symbol
            w = w + _pick(rng, ["|", "~", "^", "'", ":", "»", "_"])
        words[i] = w
    return " ".join(words)


def make_report(
    rng: np.random.Generator, subtype: str, spatial: int, bag: int, n_slides: int
) -> str:
    """One case's report text. ``spatial``/``bag`` only decide optional remarks (sometimes)."""
    if subtype not in SUBTYPE_REPORT_TERMS:
        raise ValueError(f"unknown subtype {subtype!r}")
    organ, proc = _ORGANS[int(rng.integers(len(_ORGANS)))]
    term = _pick(rng, SUBTYPE_REPORT_TERMS[subtype])
    tumour = "tumour" if rng.random() < 0.3 else "tumor"
    grade = 3 if subtype == "small_cell" else int(rng.choice([1, 2, 2, 3]))
    size = round(float(rng.uniform(0.8, 7.5)), 1)
    parts: list[str] = [_pick(rng, _HEADERS)]
    parts += [d for d in _DEID if rng.random() < 0.5]
    if rng.random() < 0.7:
        parts.append(f"SPECIMEN: A. {organ.title()}, {proc}")
    if rng.random() < 0.6:
        age, sex = int(rng.integers(38, 86)), _pick(rng, ["male", "female"])
        hist = _pick(
            rng,
            [
                f"CLINICAL HISTORY: {age}-year-old {sex} with a mass on imaging",
                f"Clinical information: {sex}, {age} y, lesion for resection",
                "CLINICAL HISTORY: Not provided",
            ],
        )
        parts.append(hist)
    gross_first = rng.random() < 0.5
    a, b, c = sorted(np.round(rng.uniform(1.0, 12.0, 3), 1).tolist(), reverse=True)
    gross = _pick(rng, _GROSS).format(
        o=organ.lower(),
        p=proc,
        a=a,
        b=b,
        c=c,
        col=_pick(rng, _COLOURS),
        con=_pick(rng, _CONSIST),
        d=size,
        n=int(rng.integers(4, 16)),
    )
    diag = [
        _pick(rng, _DIAGNOSIS).format(
            T=term, TU=term.upper(), O=organ, o=organ.lower(), P=proc.upper()
        )
    ]
    if rng.random() < 0.8:
        g = _pick(rng, _GRADES[grade])
        diag.append(_pick(rng, [f"Histologic grade: {g}", f"Grade: {g}", f"{g.capitalize()}"]))
    if rng.random() < 0.75:
        diag.append(
            _pick(
                rng,
                [
                    f"{tumour.capitalize()} size: {size} cm in greatest dimension",
                    f"The {tumour} measures {size} cm",
                    f"Size of invasive {tumour}: {size} cm",
                ],
            )
        )
    if rng.random() < 0.7:
        mm = round(float(rng.uniform(0.5, 25)), 1)
        diag.append(
            _pick(
                rng,
                [
                    f"Margins: negative; closest margin {mm} mm",
                    f"Surgical margins free of {tumour}",
                    f"{tumour.capitalize()} extends to the deep margin",
                    f"Resection margins uninvolved (closest {mm} mm)",
                ],
            )
        )
    if rng.random() < 0.65:
        n_nodes = int(rng.integers(2, 25))
        pos = int(rng.integers(0, min(n_nodes, 6) + 1)) if rng.random() < 0.4 else 0
        diag.append(
            _pick(
                rng,
                [
                    f"Lymph nodes: {pos}/{n_nodes} involved",
                    f"{n_nodes} lymph nodes examined, {pos} with metastatic carcinoma ({pos}/{n_nodes})",
                    f"Regional nodes ({pos}/{n_nodes})",
                ],
            )
        )
    if rng.random() < 0.5:
        diag.append(
            f"Lymphovascular invasion: {_pick(rng, ['not identified', 'present', 'indeterminate'])}"
        )
    if bag and rng.random() < BIOMARKER_REMARK_RATES["bag"]["pos"]:
        diag.append(
            _pick(
                rng,
                [
                    f"A signet-ring cell component is present (about {int(rng.integers(15, 31))}% of {tumour} cells)",
                    "Focal signet ring cell differentiation noted",
                ],
            )
        )
    elif not bag and rng.random() < BIOMARKER_REMARK_RATES["bag"]["neg"]:
        diag.append("No signet ring cells identified")
    if spatial and rng.random() < BIOMARKER_REMARK_RATES["spatial"]["pos"]:
        diag.append("Brisk lymphocytic infiltrate at the invasive front")
    elif not spatial and rng.random() < BIOMARKER_REMARK_RATES["spatial"]["neg"]:
        diag.append(
            f"Lymphoid aggregates present away from the {tumour}; few intratumoral lymphocytes"
        )
    if rng.random() < 0.4:
        diag.append(f"Pathologic stage: pT{int(rng.integers(1, 5))} pN{int(rng.integers(0, 3))}")
    body = [gross] + diag if gross_first else diag + [gross]
    parts += body
    if n_slides > 1 and rng.random() < 0.5:
        parts.append(f"{n_slides} slides reviewed")
    parts.append(
        _pick(
            rng,
            [
                "Electronically signed out by [PATHOLOGIST], MD on [DATE]",
                "Attending pathologist: [NAME]. END OF REPORT",
                "I have personally reviewed the material and agree with the above. [SIGNATURE]",
                "Case discussed at the departmental consensus conference",
            ],
        )
    )
    text = ". ".join(p.rstrip(".") for p in parts) + "."
    if rng.random() < 0.3:
        text = text.upper()
    return _noise(rng, text, rate=float(rng.uniform(0.0, 0.04)))
