"""The teacher: loading and quantising it (:mod:`.load`, :mod:`.quantize`) and its cache: the format
(:mod:`.cache_format`), what it was built for (:mod:`.fingerprint`), the reader (:mod:`.cache`) and the builder
(:mod:`.build`). ``python -m mllm_kd.teacher`` trains a teacher (``__main__``)."""
