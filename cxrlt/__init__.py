"""cxrlt: long-tailed, multi-label chest X-ray classification (CXR-LT), from data to served model.

The library never imports prefect, bentoml, streamlit or evidently at module level: those are callers.
"""

__version__ = "0.1.0"
