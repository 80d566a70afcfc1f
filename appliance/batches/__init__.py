"""Files and batches: uploads to disk, the Batch object and its rules, the runner and its admission.

Imports api/ (batch lines go through the same surfaces), core/ and the layers below.
"""
