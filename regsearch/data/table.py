"""A user's table (CSV, TSV, Parquet) as tensors, with its preprocessing fitted on the training split only.

The fitted preprocessor travels with the data (`TensorData.preprocessor`) so that a logged model can take raw
rows with the table's columns, exactly as they are written in the file.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from regsearch._errors import ConfigError, DataError, unknown_name
from regsearch.data._tensors import TensorData

MISSING = frozenset({"", "?", "NA", "N/A", "NaN", "nan", "null", "NULL"})
"""Cell values (after stripping whitespace) read as missing; the UCI files write ` ?`."""

MOSTLY_NUMERIC = 0.95
"""A column whose values are numbers but for a few is taken as numeric with bad cells, not as categories."""

REPEATS_WORTH_SAYING = 0.05
"""A validation or test split with this share of rows whose inputs repeat a training row's is worth a warning."""

logger = logging.getLogger("regsearch")

_PARQUET = (".parquet", ".pq")
_TAB = (".tsv", ".tab")
_NUMBER = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"


def load_table(path: str | Path, target: str, *, test_path: str | Path | None = None,
               features: Sequence[str] | None = None, categorical: Sequence[str] | None = None,
               id_columns: Sequence[str] | None = None, val_fraction: float = 0.2, seed: int = 0,
               train_size: int | None = None, group_repeats: bool = False) -> TensorData:
    """Read a table, split it seeded (stratified where possible), fit imputers/scaler/one-hot on train only.

    Without `test_path` the test split is None. Classes are the sorted label values (`TensorData.classes`).
    `group_repeats` keeps rows with the same inputs on one side of the split, so validation cannot reward memory.
    """
    if not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction must be in (0, 1); got {val_fraction}")
    if train_size is not None and train_size < 3:
        raise ConfigError(f"train_size must be at least 3; got {train_size}")
    path = Path(path)
    frame = read_table(path)
    inputs = _input_columns(frame, path, target, _names(features, "features"), _names(id_columns, "id_columns"))
    numeric, categories = _column_kinds(frame, path, inputs, _names(categorical, "categorical"))
    _check_numbers(frame, path, numeric)
    labels = _label_text(frame, path, target)
    classes, is_number = _classes(labels, path, target)
    y = _class_ids(labels, classes, is_number)
    x_test = y_test = None
    if test_path is not None:
        test_path = Path(test_path)
        test = read_table(test_path)
        for column in (*inputs, target):
            if column not in test.columns:
                raise DataError(f"{test_path} has no column {column!r} (the training table {path} has)")
        _check_numbers(test, test_path, numeric)
        y_test = torch.from_numpy(_test_ids(test, test_path, target, classes, is_number))
    groups = _row_groups(clean_columns(frame, numeric, categories)) if group_repeats else None
    train, val = _split(y, val_fraction, seed, train_size, groups)
    preprocessor = make_preprocessor(numeric, categories).fit(frame.iloc[train])
    if test_path is not None:
        x_test = torch.from_numpy(preprocessor.transform(test))
    data = TensorData(
        torch.from_numpy(preprocessor.transform(frame.iloc[train])), torch.from_numpy(y[train]),
        torch.from_numpy(preprocessor.transform(frame.iloc[val])), torch.from_numpy(y[val]),
        x_test, y_test, len(classes), name=path.stem, classes=classes, preprocessor=preprocessor,
        columns=tuple(inputs), group_repeats=group_repeats)
    _warn_of_repeats(data, path)
    return data


def seen_rows(x_train: torch.Tensor, *splits: torch.Tensor) -> list[np.ndarray]:
    """Per split, which of its rows have (encoded) inputs exactly those of some training row."""
    known = {row.tobytes() for row in x_train.cpu().numpy()}
    return [np.array([row.tobytes() in known for row in x.cpu().numpy()], dtype=bool) for x in splits]


def _warn_of_repeats(data: TensorData, path: Path) -> None:
    """Say so when validation or test rows repeat training rows: accuracy on them rewards memorising, and on the
    validation split that favours the least regularized trials."""
    splits = [data.x_val] if data.x_test is None else [data.x_val, data.x_test]
    shares = [float(seen.mean()) if len(seen) else 0.0 for seen in seen_rows(data.x_train, *splits)]
    val, test = shares[0], shares[-1] if data.x_test is not None else 0.0
    drop = "duplicate records? drop them from the files if so"
    if val >= REPEATS_WORTH_SAYING:
        said = f"{val:.0%} of the validation rows" + (f" and {test:.0%} of the test rows" if data.x_test is not None
                                                       else "")
        why = "accuracy on them rewards memorising, which favours less regularization"
        fix = drop if data.group_repeats else ("set data.group_repeats=true to keep repeated rows on one side of "
                                               "the validation split")
    elif test >= REPEATS_WORTH_SAYING:
        said, why, fix = (f"{test:.0%} of the test rows", "test accuracy on them measures memory, not generalization",
                          drop)
    else:
        return
    logger.warning("%s: %s repeat a training row's inputs exactly; %s (%s)", path.name, said, why, fix)


def read_table(path: Path) -> pd.DataFrame:
    """The table as read, blank rows dropped; index = data row (0 is the line after the header, or Parquet row 0)."""
    if not path.is_file():
        raise DataError(f"no table at {path}" if not path.exists() else f"{path} is not a file")
    if path.suffix.lower() in _PARQUET:
        try:
            import pyarrow  # noqa: F401  (pandas' Parquet engine)
        except ImportError:
            raise DataError(f"reading {path} (Parquet) needs pyarrow: pip install pyarrow") from None
        try:
            frame = pd.read_parquet(path)
        except (ValueError, OSError) as e:  # pyarrow's ArrowInvalid and ArrowIOError
            raise DataError(f"{path} is not a readable Parquet file: {_first_line(e)}") from None
        frame = frame.reset_index(drop=True)
    else:
        frame = _read_text(path)
    frame.columns = [str(c).strip() for c in frame.columns]
    blank = pd.concat([_strings(frame[c]).isna() for c in frame.columns], axis=1).all(axis=1)
    frame = frame[~blank.to_numpy()]
    if frame.empty:
        raise DataError(f"{path} has no data rows")
    return frame


def _read_text(path: Path) -> pd.DataFrame:
    """CSV or TSV as strings, so that every value is judged by the same rules whatever pandas would guess."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)
            return pd.read_csv(path, sep=_delimiter(path), dtype=str, keep_default_na=False, index_col=False,
                               skip_blank_lines=False)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path} is empty (not even a header row)") from None
    except pd.errors.ParserWarning:
        raise DataError(f"{path}: a row has more fields than the header") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not a readable table: {_first_line(e)}") from None


def _delimiter(path: Path) -> str:
    """Tab for .tsv/.tab; otherwise the most frequent of comma, tab and semicolon in the header line."""
    if path.suffix.lower() in _TAB:
        return "\t"
    with open(path, encoding="utf-8", errors="replace") as f:
        header = f.readline()
    counts = {sep: header.count(sep) for sep in (",", "\t", ";")}
    best = max(counts, key=counts.get)
    return best if counts[best] > counts[","] else ","


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _names(value: Sequence[str] | None, what: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{what} must be a list of column names; got {value!r}")
    return list(dict.fromkeys(value))


def _input_columns(frame: pd.DataFrame, path: Path, target: str, features: list[str] | None,
                   id_columns: list[str] | None) -> list[str]:
    """The model's input columns: `features` (else every column), less the target and the id columns."""
    columns = list(frame.columns)
    if target not in columns:
        raise DataError(f"{path}: {unknown_name('target column', target, columns)}")
    for what, names in (("features", features), ("id_columns", id_columns)):
        for name in names or ():
            if name not in columns:
                raise DataError(f"{path}: {unknown_name(f'column in {what}', name, columns)}")
            if name == target:
                raise DataError(f"{path}: the target {target!r} is listed in {what}; it cannot be an input")
    ids = set(id_columns or ())
    both = [name for name in features or () if name in ids]
    if both:
        raise DataError(f"{path}: column {both[0]!r} is listed both in features and in id_columns")
    inputs = [c for c in (columns if features is None else features) if c != target and c not in ids]
    if not inputs:
        raise DataError(f"{path}: no input columns are left besides the target {target!r}")
    for column in inputs:
        if _strings(frame[column]).isna().all():
            raise DataError(f"{path}: column {column!r} is empty (every value is missing)")
    return inputs


def _column_kinds(frame: pd.DataFrame, path: Path, inputs: list[str],
                  categorical: list[str] | None) -> tuple[list[str], list[str]]:
    """(numeric, categorical) input columns: as declared, or by their values."""
    if categorical is not None:
        for name in categorical:
            if name not in frame.columns:
                raise DataError(f"{path}: {unknown_name('column in categorical', name, frame.columns)}")
            if name not in inputs:
                raise DataError(f"{path}: column {name!r} is listed in categorical but is not an input "
                                "(it is the target, an id column, or not in features)")
        return [c for c in inputs if c not in categorical], [c for c in inputs if c in categorical]
    numeric = [c for c in inputs if _looks_numeric(frame[c])]
    return numeric, [c for c in inputs if c not in numeric]


def _looks_numeric(column: pd.Series) -> bool:
    """Numeric by dtype; text when nearly every present value is a number (the rest are then reported as bad)."""
    if pd.api.types.is_bool_dtype(column):
        return False
    if pd.api.types.is_numeric_dtype(column):
        return True
    numbers, bad = _numbers(column)
    present = int(numbers.notna().sum() + bad.sum())
    return 1 - bad.sum() / present >= MOSTLY_NUMERIC


def _check_numbers(frame: pd.DataFrame, path: Path, numeric: list[str]) -> None:
    """A non-numeric cell in a numeric column: the file, column, line and value, in one line."""
    for column in numeric:
        _, bad = _numbers(frame[column])
        if bad.any():
            row = bad.index[bad.to_numpy().argmax()]
            raise DataError(f"{path}: column {column!r}, {_where(path, row)}: {frame[column][row]!r} is not a "
                            "number (list the column in categorical if its values are categories)")


def _where(path: Path, row: int) -> str:
    if path.suffix.lower() in _PARQUET:
        return f"row {row + 1}"
    return f"line {row + 2} (the header is line 1)"


def _strings(column: pd.Series) -> pd.Series:
    """Values as stripped strings (pandas' string dtype), the missing-value tokens as <NA>."""
    text = column.astype("string").str.strip()
    return text.mask(text.isin(MISSING))


def _text(column: pd.Series) -> pd.Series:
    """Values as stripped strings of object dtype with np.nan for missing: what the imputer and encoder take."""
    text = _strings(column)
    return text.astype(object).where(text.notna(), np.nan)


def _numbers(column: pd.Series) -> tuple[pd.Series, pd.Series]:
    """(values as float64 with NaN for missing, mask of present values that are not finite numbers)."""
    if pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column):
        numbers = column.astype("float64")
        return numbers, pd.Series(np.isinf(numbers.to_numpy()), index=column.index)
    text = _strings(column)
    # a pattern rather than float(): "inf", "nan" and "1_000" are not numbers in a table; it is also 10x faster
    bad = (text.notna() & ~text.str.fullmatch(_NUMBER).fillna(False)).astype(bool)
    return text.mask(bad).astype("float64"), bad


def clean_columns(frame: pd.DataFrame, numeric: Sequence[str], categorical: Sequence[str]) -> pd.DataFrame:
    """Raw rows to what the encoders take: numbers as float64, categories as stripped strings, missing as NaN."""
    lacking = [c for c in (*numeric, *categorical) if c not in frame.columns]
    if lacking:
        raise DataError(f"the rows lack column(s) {', '.join(map(repr, lacking))}")
    out = {}
    for column in numeric:
        numbers, bad = _numbers(frame[column])
        if bad.any():
            at = int(bad.to_numpy().argmax())
            raise DataError(f"column {column!r}, row {at + 1}: {frame[column].iloc[at]!r} is not a number")
        out[column] = numbers
    for column in categorical:
        out[column] = _text(frame[column])
    return pd.DataFrame(out, index=frame.index)


def _as_float32(x: Any) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def make_preprocessor(numeric: Sequence[str], categorical: Sequence[str]) -> Any:
    """An unfitted sklearn Pipeline: clean, then median+scale numbers, most-frequent+one-hot categories."""
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer, OneHotEncoder, StandardScaler

    numeric, categorical = list(numeric), list(categorical)
    columns = ColumnTransformer([
        ("numeric", Pipeline([("impute", SimpleImputer(strategy="median")), ("scale", StandardScaler())]),
         numeric),
        ("categorical", Pipeline([
            ("impute", SimpleImputer(strategy="most_frequent")),
            ("onehot", OneHotEncoder(handle_unknown="ignore", sparse_output=False, dtype=np.float32))]),
         categorical),
    ], sparse_threshold=0.0)
    return Pipeline([
        ("clean", FunctionTransformer(clean_columns, kw_args={"numeric": numeric, "categorical": categorical})),
        ("columns", columns),
        ("float32", FunctionTransformer(_as_float32)),
    ])


def _label_text(frame: pd.DataFrame, path: Path, target: str) -> pd.Series:
    labels = _strings(frame[target])
    if labels.isna().any():
        row = labels.index[labels.isna().to_numpy().argmax()]
        raise DataError(f"{path}: the target {target!r} is missing at {_where(path, row)}")
    return labels


def _plain(value: Any) -> Any:
    """A label as the Python value it stands for: int where integral, else float (NaN stays NaN)."""
    value = float(value)
    return int(value) if value.is_integer() else value


def _label_keys(labels: pd.Series, is_number: bool) -> pd.Series:
    if not is_number:
        return labels.astype(object)
    return _numbers(labels)[0].map(_plain).astype(object)


def _classes(labels: pd.Series, path: Path, target: str) -> tuple[tuple, bool]:
    """The sorted class values (numbers when every label is one, else strings), and whether they are numbers."""
    is_number = not _numbers(labels)[1].any()
    classes = tuple(sorted(set(_label_keys(labels, is_number))))
    if len(classes) < 2:
        raise DataError(f"{path}: the target {target!r} has one class ({classes[0]!r}); nothing to learn")
    return classes, is_number


def _class_ids(labels: pd.Series, classes: tuple, is_number: bool) -> np.ndarray:
    ids = {value: i for i, value in enumerate(classes)}
    return np.array(_label_keys(labels, is_number).map(ids), dtype=np.int64)


def _test_ids(test: pd.DataFrame, path: Path, target: str, classes: tuple, is_number: bool) -> np.ndarray:
    """Test labels as class ids; `>50K.` counts as `>50K` when dropping the trailing dot makes every label known."""
    labels = _label_text(test, path, target)
    known = _label_keys(labels, is_number).isin(classes)
    if not known.all():
        undotted = labels.str.removesuffix(".").str.rstrip()
        if _label_keys(undotted, is_number).isin(classes).all():
            labels = undotted
        else:
            row = known.index[(~known).to_numpy().argmax()]
            raise DataError(f"{path}: the target {target!r} at {_where(path, row)} is {labels[row]!r}, a class "
                            f"the training table does not have (classes: {', '.join(map(str, classes))})")
    return _class_ids(labels, classes, is_number)


def _row_groups(inputs: pd.DataFrame) -> np.ndarray:
    """One id per distinct row of cleaned inputs (rows that repeat another's share its id: `1` and `1.0` alike)."""
    return np.unique(pd.util.hash_pandas_object(inputs, index=False).to_numpy(), return_inverse=True)[1]


def _split(y: np.ndarray, val_fraction: float, seed: int, train_size: int | None,
           groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train / validation row positions; stratified by class when every class can be on both sides.
    With `groups`, rows of one group fall on the same side."""
    from sklearn.model_selection import train_test_split

    rows = np.arange(len(y))
    if train_size is not None and train_size < len(rows):
        rows, _ = train_test_split(rows, train_size=train_size, random_state=seed,
                                   stratify=_strata(y[rows], train_size, len(rows) - train_size))
    if groups is not None:
        return _split_groups(rows, y, groups[rows], val_fraction, seed)
    n_val = max(1, round(len(rows) * val_fraction))
    if len(rows) - n_val < 2:
        raise DataError(f"{len(rows)} training rows are too few to split off a validation set")
    train, val = train_test_split(rows, test_size=n_val, random_state=seed,
                                  stratify=_strata(y[rows], len(rows) - n_val, n_val))
    return np.sort(train), np.sort(val)


def _split_groups(rows: np.ndarray, y: np.ndarray, groups: np.ndarray, val_fraction: float, seed: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Split one row of each group (stratified by its label) and let the group's other rows follow it: the
    validation split holds about `val_fraction` of the distinct rows, more or fewer of all rows."""
    from sklearn.model_selection import train_test_split

    heads = np.unique(groups, return_index=True)[1]
    n_val = max(1, round(len(heads) * val_fraction))
    if len(heads) - n_val < 2:
        raise DataError(f"{len(heads)} distinct input rows are too few to split off a validation set with "
                        "group_repeats")
    _, val_heads = train_test_split(heads, test_size=n_val, random_state=seed,
                                    stratify=_strata(y[rows[heads]], len(heads) - n_val, n_val))
    in_val = np.isin(groups, groups[val_heads])
    return np.sort(rows[~in_val]), np.sort(rows[in_val])


def _strata(y: np.ndarray, n_first: int, n_second: int) -> np.ndarray | None:
    counts = np.bincount(y)
    counts = counts[counts > 0]
    if counts.min() < 2 or min(n_first, n_second) < len(counts):
        return None
    return y
