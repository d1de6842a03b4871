"""A small timm Vision Transformer for 8x8 digits or 28x28 Fashion-MNIST: patches of 2 (or 4)
pixels, 4 blocks of 4 heads. ``granular search benchmarks/models/vit_tiny.py ...`` prunes its
heads, MLP widths, blocks and weights together."""

import timm


def build_model(num_classes: int = 10, in_channels: int = 1, image_size: int = 8):
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, in_chans=in_channels,
                             img_size=image_size, patch_size=2 if image_size <= 16 else 4, depth=4,
                             num_heads=4, embed_dim=64, mlp_ratio=2.0)
