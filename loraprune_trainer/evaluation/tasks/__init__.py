"""lm-eval task definitions of the zero-shot suite read from local files (package data).

Each ``<task>.yaml`` is lm-eval's official task with only the data source changed (``dataset_path:
json`` and ``data_files`` relative to a zero-shot folder); :mod:`.utils` holds the ``process_docs``
functions that turn each upstream file format into the rows the official task expects. See
:mod:`loraprune_trainer.evaluation.zeroshot`.
"""
