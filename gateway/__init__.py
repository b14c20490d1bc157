"""studybridge gateway: the DICOM node, the archive core, imports, and the command line."""

__version__ = "0.1.0"
