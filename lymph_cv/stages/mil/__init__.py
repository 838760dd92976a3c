"""Multiple-instance learning over bags: instance arrays (:mod:`.data`), training (:mod:`.train`),
evaluation and its outputs (:mod:`.evaluate`).  The heads and the bag model are in :mod:`lymph_cv.net.mil`."""
