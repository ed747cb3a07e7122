"""Files in and out, in one place: ``names`` (every file name a checkpoint folder holds), ``shards`` (safetensors
checkpoints read tensor by tensor, and the decoder layers that read theirs from them), ``output`` (output folders
claimed and written atomically) and ``checkpoint`` (a model written as a checkpoint folder).

Nothing here imports the package beyond ``errors``, so every layer above may read and write files through it; the
package itself imports none of its modules, so importing one stays cheap.
"""
