"""The BentoML service of cxrlt (see service.py); run from the project root."""
