"""`none`: the layer stays exactly the frozen backbone's."""
from pefttune.methods.base import MethodSpec, register_method

SPEC = register_method(
    MethodSpec(
        name="none",
        description="No PEFT module in this layer (the DARTS 'skip' option).",
        hparams={},
        count=lambda info, hp: 0,
        build=None,
        mergeable=True,
    )
)
