"""ich: intracranial hemorrhage triage on head CT.

Importing the package imports nothing heavy; submodules are loaded on use, so ``python -m ich info``
never pulls in torch or Streamlit. Not a medical device.
"""

__version__ = "0.1.0"
