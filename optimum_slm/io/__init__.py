"""Files in and out, in one place: ``names`` (every file name a checkpoint folder holds), ``shards`` (safetensors
checkpoints read tensor by tensor, and the decoder layers that read theirs from them), ``output`` (output folders
claimed and written atomically), ``checkpoint`` (a model written as a checkpoint folder), ``manifest`` (file
digests remembered by file identity, weight manifests of cached checkpoints) and ``gguf_export`` (a checkpoint as
one GGUF file for llama.cpp).

Nothing here imports the package beyond ``errors`` and ``progress``, so every layer above may read and write files through it; the
package itself imports none of its modules, so importing one stays cheap.
"""
