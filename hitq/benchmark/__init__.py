"""RealHiTBench inputs: QA files (with SC derivation), table/image files, prompt sets and
protocols, token-exact fitting of tables, answer extraction, table rendering and preflight.

Pure Python (+ Pillow for rendering): nothing here imports torch, transformers or the database.
Token counting is passed in as a callable by the caller (an engine or a test).
"""
