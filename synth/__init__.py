"""PASTA-Gen-style synthetic tumor CT: phantom anatomy, 15 lesion types, structured reports.

Public surface:
- vocabularies (`synth.vocabulary`): LESION_TYPES, HOST_ORGANS, ATTRIBUTES, T_STAGES, PHASES
- `GenConfig`, `generate_case(seed, index, config)`: one phantom case in memory
- `generate_dataset(out, n, config, workers)`: a dataset on disk (PASTA-Gen-30K layout)
- `insert_into_ct(ct, organs, out, ...)`: lesions into a user's CT given an organ mask
- `read_dataset(root)`: our datasets and the released PASTA-Gen-30K
- `show_case(case_dir, png)`: a montage of a case
- `SynthInputError`: bad input, with a message naming it
"""
from synth.errors import SynthInputError
from synth.vocabulary import ATTRIBUTES, HOST_ORGANS, LESION_TYPE_NAMES, LESION_TYPES, PHASES, T_STAGES

__all__ = [
    "ATTRIBUTES", "HOST_ORGANS", "LESION_TYPES", "LESION_TYPE_NAMES", "PHASES", "T_STAGES",
    "GenConfig", "generate_case", "generate_dataset", "insert_into_ct", "read_dataset", "show_case",
    "SynthInputError", "CaseRecord",
]

_LAZY = {
    "GenConfig": "synth.generate", "generate_case": "synth.generate", "generate_dataset": "synth.run",
    "insert_into_ct": "synth.from_ct", "read_dataset": "synth.dataset", "CaseRecord": "synth.dataset",
    "show_case": "synth.show",
}


def __getattr__(name):  # keep `import synth` light: the generator loads on first use
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'synth' has no attribute {name!r}")
