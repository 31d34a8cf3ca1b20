"""What exists, by name: the models and what each takes, the attention modules and the arguments a spec may set on
each, the placements. Declared here once, with no torch import, so that a process that only validates specs or
lists names (the service's API) reads them without torch.

The torch modules are checked against this catalog: `san.registry.register_model` refuses a model that is not
here (or that takes other inputs), and tests/test_torch_free.py compares the attention modules' names and
constructor signatures, the placements, `san.attention.san`'s activations and `san.attention.bam`'s combines with
what is declared here.
"""

# Model name → what it takes: "images" (N×C×H×W) or "sequences" (N×T×F). In registration order (`san.models`
# imports lenet, lstm, resnet, vgg), which is the order users see them in.
INPUT_KINDS = ("images", "sequences")
MODELS: dict[str, str] = {
    "lenet5": "images",
    "lstm4": "sequences",
    "resnet18": "images",
    "resnet50": "images",
    "vgg16": "images",
    "vgg16_bn": "images",
    "vgg16_c": "images",
    "vgg19": "images",
    "vgg19_bn": "images",
}

# The keyword arguments a spec may set on each attention module, in its constructor's order (those the backbone
# sets at each position — channels, prev_channels, dims — are not among them): name → BOOL for a switch, else the
# entry of `training.config.ATTENTION_KWARG_TYPES` that gives its type and bounds.
BOOL = "bool"
_SAN = {
    "kernel_size": "kernel_size",
    "dilation": "dilation",
    "use_abs": BOOL,
    "use_cca": BOOL,
    "use_extrema": BOOL,
    "use_smoothing": BOOL,
    "smoothing_activation": "smoothing_activation",
    "smoothing_groups": "smoothing_groups",
}
ATTENTION_PARAMETERS: dict[str, dict[str, str]] = {
    "san-c": _SAN,  # SAN with dilation 1
    "san-d": _SAN,  # SAN with dilation 2
    "cbam": {"reduction": "reduction", "spatial_kernel_size": "spatial_kernel_size"},
    "bam": {"reduction": "reduction", "dilation": "dilation", "num_dilated": "num_dilated", "combine": "combine"},
    "ran": {},
}
ATTENTION_NAMES = ("none", *ATTENTION_PARAMETERS)  # "none": no module

PLACEMENTS = ("bottleneck", "full", "reference")

SMOOTHING_ACTIVATIONS = ("identity", "relu", "tanh", "sigmoid")  # SAN's smoothing_activation
COMBINES = ("sum", "product")  # BAM's combine: how its channel and spatial logits join
