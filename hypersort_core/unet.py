"""The paper's 3D UNet as an ordinary `nn.Module`, with one set of weights.

Module names follow the public HyperSORT reference implementation, so its
`state_dict` lists the same tensors in the same order with the same shapes.
That order is the layout of the flat parameter vector theta the hyper-network
predicts (see `model.py`), and this module is what an exported style becomes.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

ARCHITECTURE_KEY = "architecture"  # safetensors metadata: the constructor's arguments as JSON


def _block(conv: nn.Module, channels: int) -> list[nn.Module]:
    return [conv, nn.ReLU(), nn.InstanceNorm3d(channels, affine=True)]


class UNet(nn.Module):
    """conv -> ReLU -> InstanceNorm(affine) blocks; stride-2 conv down, k4 s2 p1 transposed conv up, skip concatenation."""

    def __init__(self, in_channels: int, out_channels: int, levels: int, convs_per_level: int, base_channels: int) -> None:
        super().__init__()
        self.levels, self.convs_per_level = levels, convs_per_level
        width = [base_channels * 2**level for level in range(levels + 1)]
        self._add("init", _block(nn.Conv3d(in_channels, width[0], 3, 1, 1), width[0]))
        for i in range(convs_per_level):
            self._add(f"0_{i}", _block(nn.Conv3d(width[0], width[0], 3, 1, 1), width[0]))
        for level in range(levels):
            self._add(f"down_{level}", _block(nn.Conv3d(width[level], width[level + 1], 3, 2, 1), width[level + 1]))
            for i in range(convs_per_level):
                self._add(f"{level + 1}_{i}", _block(nn.Conv3d(width[level + 1], width[level + 1], 3, 1, 1), width[level + 1]))
        for level in range(levels):
            self._add(f"up_{level}", _block(nn.ConvTranspose3d(width[level + 1], width[level], 4, 2, 1), width[level]))
            for i in range(convs_per_level):
                cin = width[level + 1] if i == 0 else width[level]
                self._add(f"dec_{level}_{i}", _block(nn.Conv3d(cin, width[level], 3, 1, 1), width[level]))
        self.conv_final = nn.Conv3d(width[0], out_channels, 3, 1, 1)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> UNet:
        """The UNet `hsort export` wrote: safetensors weights, with its architecture in the file's metadata."""
        from safetensors import (
            safe_open,  # imported here: the model itself needs no file format
        )

        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            if ARCHITECTURE_KEY not in metadata:
                raise ValueError(f"{path}: no {ARCHITECTURE_KEY!r} in the file's metadata; not a UNet written by hsort export")
            unet = cls(**json.loads(metadata[ARCHITECTURE_KEY]))
            unet.load_state_dict({name: handle.get_tensor(name) for name in handle.keys()})  # noqa: SIM118 (a safetensors handle is not iterable)
        return unet.eval()

    def _add(self, tag: str, block: list[nn.Module]) -> None:
        """Register conv/act/norm under the reference's names (conv_init, down_0, dec_conv_0_1, ...)."""
        conv, act, norm = block
        if tag.startswith(("down_", "up_")):
            kind, level = tag.split("_")
            names = (tag, f"{kind}_act_{level}", f"{kind}_norm_{level}")
        elif tag.startswith("dec_"):
            names = (f"dec_conv_{tag[4:]}", f"dec_act_{tag[4:]}", f"dec_norm_{tag[4:]}")
        else:
            names = (f"conv_{tag}", f"act_{tag}", f"norm_{tag}")
        for name, module in zip(names, (conv, act, norm)):
            self.add_module(name, module)

    def _run(self, *names: str, x: torch.Tensor) -> torch.Tensor:
        for name in names:
            x = self.get_submodule(name)(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._run("conv_init", "act_init", "norm_init", x=x)
        for i in range(self.convs_per_level):
            x = self._run(f"conv_0_{i}", f"act_0_{i}", f"norm_0_{i}", x=x)
        skips = [x]
        for level in range(self.levels):
            x = self._run(f"down_{level}", f"down_act_{level}", f"down_norm_{level}", x=x)
            for i in range(self.convs_per_level):
                x = self._run(f"conv_{level + 1}_{i}", f"act_{level + 1}_{i}", f"norm_{level + 1}_{i}", x=x)
            skips.append(x)
        for level in reversed(range(self.levels)):
            x = self._run(f"up_{level}", f"up_act_{level}", f"up_norm_{level}", x=x)
            x = torch.cat([x, skips[level]], dim=1)
            for i in range(self.convs_per_level):
                x = self._run(f"dec_conv_{level}_{i}", f"dec_act_{level}_{i}", f"dec_norm_{level}_{i}", x=x)
        return self.conv_final(x)
