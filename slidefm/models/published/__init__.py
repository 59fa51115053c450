"""Published slide encoders (Prov-GigaPath, TITAN-preview, CHIEF) on slidefm's own attention.

Each module restates one published model's forward pass with the module names of its
checkpoint (so loading is a strict key match, after the small converter beside it), reusing
slidefm's LongNet (``padding="torchscale"``), 2D-ALiBi blocks and gated attention pooling.
Build them through ``slidefm.models.create_slide_encoder``.
"""
