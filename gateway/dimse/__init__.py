"""The DICOM node: C-ECHO, C-STORE, C-FIND, C-MOVE and C-GET over pynetdicom."""
