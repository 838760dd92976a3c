"""``bags``: the lymphocytosis layout, one folder of cell images per patient plus a clinical CSV.

``DATA/<patient_id>/*.jpg|png|tif`` and a CSV (by default the one ``*.csv`` in ``DATA``) with one row
per patient: ``ID,LABEL,GENDER,DOB,LYMPH_COUNT`` by default, the column names configurable
(:class:`ClinicalColumns`).  ``LABEL`` is a class name or a label index; ``DOB`` a date (ISO
``1950-03-21``, ``3/21/1950`` as the challenge's files write it, ``21-03-1950`` or ``21.03.1950``) or an
age in years; ``GENDER`` M/F (male/female, 1/0); ``LYMPH_COUNT`` a non-negative number.

A missing or malformed clinical value stops the scan with one line naming the CSV, the row and the
column, unless ``impute="median"``: then the value stays ``None`` here, is listed in the result's
``imputed``, and the median of the *training* bags fills it when the features are standardised
(:class:`lymph_cv.stages.bags.ClinicalScaler`), so no test value leaks into the fill.
"""
from __future__ import annotations

import csv
import datetime as dt
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

from lymph_cv.errors import ConfigError, InputError
from lymph_cv.stages.sources.registry import SourceImage, register

#: The instance image files of a patient folder.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
#: Classes of the lymphocytosis task, label 0 and 1 (the challenge's LABEL column).
BAG_CLASSES = ("reactive", "tumoral")
#: Ages are computed at this date unless another is given (recorded with the bags).
REFERENCE_DATE = dt.date(2021, 1, 1)
REFERENCE_DATE_TEXT = REFERENCE_DATE.isoformat()
#: Days of a mean year (ages from dates of birth).
DAYS_PER_YEAR = 365.25
#: A DOB column value that is a plain number at most this is an age in years.
MAX_AGE = 130.0
#: How to encode gender (recorded): the value, lower-cased → number.
GENDER_CODES = {"m": 1.0, "male": 1.0, "1": 1.0, "f": 0.0, "female": 0.0, "0": 0.0}
#: Cell values read as missing.
MISSING = ("", "na", "nan", "n/a", "none", "null", "?")
#: Date formats tried in order for DOB (slashes: month first, as the challenge's CSV).
DATE_FORMATS = ("%Y-%m-%d", "%m/%d/%Y", "%d-%m-%Y", "%d.%m.%Y", "%Y/%m/%d")
IMPUTE_CHOICES = ("none", "median")
#: Clinical feature names in feature order, each from one column of :class:`ClinicalColumns`.
FEATURES = ("age", "lymph_count", "gender")


@dataclass(frozen=True)
class ClinicalColumns:
    """The CSV's column names; a clinical column set to None is not used."""

    id: str = "ID"
    label: str = "LABEL"
    gender: Optional[str] = "GENDER"
    dob: Optional[str] = "DOB"
    count: Optional[str] = "LYMPH_COUNT"

    def feature_columns(self) -> Dict[str, str]:
        """Feature name → CSV column, for the clinical columns in use (feature order)."""
        named = {"age": self.dob, "lymph_count": self.count, "gender": self.gender}
        return {feature: column for feature, column in named.items() if column}

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def parse(cls, pairs: Dict[str, str], option: str = "--columns") -> "ClinicalColumns":
        """From ``{"id": "PID", "dob": "AGE", "gender": ""}`` (an empty name drops that column)."""
        valid = [f.name for f in fields(cls)]
        unknown = [key for key in pairs if key not in valid]
        if unknown:
            raise ConfigError(f"{option}: unknown column key {unknown[0]!r}", valid=valid)
        values = {key: (value or None) for key, value in pairs.items()}
        for key in ("id", "label"):
            if key in values and not values[key]:
                raise ConfigError(f"{option}: the {key} column cannot be dropped")
        return cls(**values)


@dataclass
class PatientRow:
    """One patient: its folder's images (sorted) and its clinical values (None = to impute)."""

    id: str
    label: int
    row: int  # the CSV line number (header = 1)
    images: List[Path]
    values: Dict[str, Optional[float]]


@dataclass
class PatientScan:
    """What :func:`scan_patients` read, with the record of how."""

    classes: List[str]
    patients: List[PatientRow]
    csv_path: Path
    columns: ClinicalColumns
    reference_date: dt.date
    impute: str
    imputed: List[dict] = field(default_factory=list)  # {"row", "id", "column", "value"} per filled cell

    def record(self) -> dict:
        return {"source": "patients", "clinical_csv": str(self.csv_path), "columns": self.columns.to_json(),
                "reference_date": self.reference_date.isoformat(), "impute": self.impute, "imputed": self.imputed,
                "gender_codes": GENDER_CODES, "days_per_year": DAYS_PER_YEAR}


def default_csv(data_dir: Path) -> Path:
    """The one ``*.csv`` directly in ``data_dir``; InputError when there is none or several."""
    found = sorted(p for p in data_dir.glob("*.csv") if p.is_file())
    if len(found) != 1:
        what = "no" if not found else f"{len(found)}"
        raise InputError(f"{what} clinical CSV file(s) in the data folder; give the clinical CSV (--clinical)", data_dir)
    return found[0]


def patient_images(folder: Path) -> List[Path]:
    """A patient folder's image files (non-hidden, an image suffix), sorted by name."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


def parse_label(text: str, classes: Sequence[str]) -> Optional[int]:
    """A class name or a label index → the label; None when it is neither."""
    text = text.strip()
    if text in classes:
        return list(classes).index(text)
    try:
        number = float(text)
    except ValueError:
        return None
    if number.is_integer() and 0 <= number < len(classes):
        return int(number)
    return None


def parse_age(text: str, reference: dt.date) -> Optional[float]:
    """A DOB cell → age in years at ``reference``: an age (a number ≤ MAX_AGE) or a date; None if neither."""
    text = text.strip()
    try:
        number = float(text)
    except ValueError:
        number = None
    if number is not None:
        return number if math.isfinite(number) and 0 <= number <= MAX_AGE else None
    for fmt in DATE_FORMATS:
        try:
            born = dt.datetime.strptime(text, fmt).date()
        except ValueError:
            continue
        age = (reference - born).days / DAYS_PER_YEAR
        return age if 0 <= age <= MAX_AGE else None
    return None


def parse_count(text: str) -> Optional[float]:
    """A non-negative finite number, or None."""
    try:
        number = float(text.strip())
    except ValueError:
        return None
    return number if math.isfinite(number) and number >= 0 else None


def parse_gender(text: str) -> Optional[float]:
    """M/F (male/female, 1/0) → 1.0/0.0, or None."""
    return GENDER_CODES.get(text.strip().lower())


_EXPECTED = {"age": "a date of birth (e.g. 1950-03-21 or 3/21/1950) or an age in years",
             "lymph_count": "a non-negative number", "gender": "M or F"}


def _is_missing(text: Optional[str]) -> bool:
    return text is None or text.strip().lower() in MISSING


def read_clinical(csv_path: Path, classes: Sequence[str], columns: ClinicalColumns = ClinicalColumns(),
                  reference_date: dt.date = REFERENCE_DATE, impute: str = "none"
                  ) -> Tuple[List[Tuple[str, int, int, Dict[str, Optional[float]]]], List[dict]]:
    """The CSV's rows as (id, label, row number, feature values) and the imputed cells.

    InputError naming the file, the row and the column for a bad id, label or (without ``impute``)
    a missing or malformed clinical value; for a missing column, naming it and the header.
    """
    if impute not in IMPUTE_CHOICES:
        raise ConfigError(f"--impute: unknown choice {impute!r}", valid=IMPUTE_CHOICES)
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [name.strip() for name in (reader.fieldnames or [])]
            raw = [{(k or "").strip(): v for k, v in line.items()} for line in reader]
    except FileNotFoundError:
        raise InputError("no such clinical CSV file", csv_path) from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"cannot read the clinical CSV ({exc})", csv_path) from exc
    wanted = {"id": columns.id, "label": columns.label, **columns.feature_columns()}
    for column in wanted.values():
        if column not in header:
            raise InputError(f"no column {column!r} (header: {','.join(header) or 'empty'}; "
                             "set the column names with --columns)", csv_path)
    parsers = {"age": lambda text: parse_age(text, reference_date), "lymph_count": parse_count, "gender": parse_gender}
    rows: list = []
    imputed: List[dict] = []
    seen: Dict[str, int] = {}
    for number, line in enumerate(raw, start=2):
        ident = (line.get(columns.id) or "").strip()
        if not ident:
            raise InputError(f"row {number}, column {columns.id}: empty patient id", csv_path)
        if not valid_patient_id(ident):
            raise InputError(f"row {number}, column {columns.id}: {ident!r} is not a folder name", csv_path)
        if ident in seen:
            raise InputError(f"row {number}, column {columns.id}: patient {ident!r} already on row {seen[ident]}", csv_path)
        seen[ident] = number
        label_text = line.get(columns.label)
        label = None if label_text is None else parse_label(label_text, classes)
        if label is None:
            raise InputError(f"row {number}, column {columns.label}: {label_text!r} is not a class "
                             f"({', '.join(classes)}) or a label 0-{len(classes) - 1}", csv_path)
        values: Dict[str, Optional[float]] = {}
        for feature, column in columns.feature_columns().items():
            text = line.get(column)
            value = None if _is_missing(text) else parsers[feature](text or "")
            if value is None:
                what = "missing" if _is_missing(text) else f"{text!r} is not {_EXPECTED[feature]}"
                if impute == "none":
                    raise InputError(f"row {number}, column {column}: {what} (or use --impute median)", csv_path)
                imputed.append({"row": number, "id": ident, "column": column, "value": text})
            values[feature] = value
        rows.append((ident, label, number, values))
    if not rows:
        raise InputError("the clinical CSV has no patient rows", csv_path)
    return rows, imputed


def scan_patients(data_dir: Union[str, Path], classes: Sequence[str] = BAG_CLASSES, *,
                  clinical: Optional[Union[str, Path]] = None, columns: ClinicalColumns = ClinicalColumns(),
                  reference_date: dt.date = REFERENCE_DATE, impute: str = "none") -> PatientScan:
    """Every patient of the CSV with its folder's images; InputError for a patient without a folder or
    images, and for a folder without a CSV row."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise InputError("no such data folder; expected one sub-folder of cell images per patient", data_dir)
    if len(set(classes)) < 2:
        raise ConfigError(f"--classes: at least two distinct classes are needed, got {list(classes)}")
    csv_path = Path(clinical) if clinical is not None else default_csv(data_dir)
    rows, imputed = read_clinical(csv_path, classes, columns, reference_date, impute)
    listed = {ident for ident, *_ in rows}
    for folder in sorted(p for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if folder.name not in listed and patient_images(folder):
            raise InputError(f"patient folder {folder.name!r} has no row in the clinical CSV {csv_path}", folder)
    patients = []
    for ident, label, number, values in rows:
        folder = data_dir / ident
        if not folder.is_dir():
            raise InputError(f"row {number}, column {columns.id}: no patient folder {ident!r} in {data_dir}", csv_path)
        images = patient_images(folder)
        if not images:
            raise InputError(f"no images ({'|'.join(IMAGE_SUFFIXES)}) for patient {ident!r}", folder)
        patients.append(PatientRow(ident, label, number, images, values))
    return PatientScan(list(classes), patients, csv_path, columns, reference_date, impute, imputed)


@register("bags")
class PatientFolders:
    """One folder of cell images per patient, labels from the clinical CSV in the data folder."""

    @staticmethod
    def scan(data_dir: Path, classes: Sequence[str]) -> List[SourceImage]:
        scan = scan_patients(data_dir, classes, impute="median")  # the images only: clinical gaps do not matter here
        return [SourceImage(path, scan.classes[p.label], p.label) for p in scan.patients for path in p.images]

    @staticmethod
    def inputs(data_dir: Path, classes: Sequence[str]) -> List[Path]:
        data_dir = Path(data_dir)
        if not data_dir.is_dir():
            return []
        csvs = sorted(p for p in data_dir.glob("*.csv") if p.is_file())
        folders = sorted(p for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        return csvs + [path for folder in folders for path in patient_images(folder)]


def valid_patient_id(text: str) -> bool:
    """Whether ``text`` can name a patient folder."""
    return bool(text) and "/" not in text and text not in (".", "..") and not re.search(r"[\r\n]", text)
