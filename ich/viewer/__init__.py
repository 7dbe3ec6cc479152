"""The browser slice viewer: NiiVue (WebGL) scrolls, windows and zooms a study in the browser.

:mod:`ich.viewer.nifti` turns a stored volume and its heatmap into NIfTI, the format NiiVue reads;
:mod:`ich.viewer.component` is the Streamlit component (it imports Streamlit; this package does not).
The NiiVue bundle in ``frontend/vendor`` is served from this server: nothing is fetched from outside.
"""

from ich.viewer.nifti import LPS_TO_RAS, heatmap_nifti, slice_axis, volume_nifti

__all__ = ["LPS_TO_RAS", "heatmap_nifti", "slice_axis", "volume_nifti"]
