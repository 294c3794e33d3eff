"""mor-ds data pipeline: sources -> tokenizer -> EOS-packed token shards or streams -> rank-sharded loaders.

Knows nothing of the model (never imports ``mor_ds``). Modules:

* ``sources``       the ``--source`` syntax, ``datasets`` streaming, bad-record accounting (``DocumentStream``)
* ``embedded``      the installed demo corpus and ``ensure_embedded(cache_dir, vocab_size)``
* ``tokenizer``     ``load_tokenizer(path) -> Tokenizer`` (SentencePiece / HF tokenizer.json), ``train_sentencepiece``
* ``tokenize_pool`` ordered tokenization in worker processes
* ``shards``        shard files and ``index.json``; ``prepare`` writes them resumably
* ``loader``        ``ShardLoader`` and ``StreamLoader`` (what the trainer iterates)
* ``inspection``, ``bench``, ``cli``  the ``mor-data`` command
"""
