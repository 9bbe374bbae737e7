"""The numpy dtypes a tensor may have on the wire, and their names in the contract."""

from __future__ import annotations

# numpy dtype name -> the DataType name used on the wire (DATA_TYPE_<NAME>).
WIRE_DTYPES = {
    "float32": "FLOAT32",
    "float64": "FLOAT64",
    "float16": "FLOAT16",
    "bfloat16": "BFLOAT16",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "uint8": "UINT8",
    "uint16": "UINT16",
    "uint32": "UINT32",
    "uint64": "UINT64",
    "bool": "BOOL",
}
