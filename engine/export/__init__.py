"""Exports of a trained model that other libraries load: `launchers/export.py`.

publish.py      write into a staging folder, load back through the target library, compare, rename to OUT
clip_layout.py  our TwoTower read as CLIP's native towers (or refused, saying why)
hf.py           transformers' CLIPModel folder (+ tokenizer and image processor files)
openclip.py     open_clip's local-dir: folder (open_clip_config.json + weights)
plain.py        our own names in safetensors: any model, read back with clipzero
card.py         model_card.json: architecture, method, recipe numbers, data, steps, evaluations
verify.py       the embedding check on a fixed batch of images and captions
"""
