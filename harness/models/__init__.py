"""Model sources and artefacts: Hugging Face checkpoints, conversion to GGUF, quantized variants, the demo model.

`pipeline.ModelsStage` (and `prepare_models`, what it runs) is the stage's entry point; `records` is its output
(models.json), read by every later stage; the other submodules hold its parts: sources (hub, directory, GGUF file,
demo model), convert (convert_hf_to_gguf.py, gguf-py) and quantize (llama-imatrix, llama-quantize). The package
itself imports nothing, so that reading models.json does not import the stage.
"""
