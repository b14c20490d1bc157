"""The demo: synthetic patients, institutions, studies and accounts to try studybridge.

``studybridge demo`` (or ``studybridge serve --demo``) seeds them (``seed``); every
seeded row is recorded in ``demo_marks`` (``models``) and a production configuration
refuses a database that holds any (``refuse_in_production``). The images are made
here (``synthetic``): never real patient data.
"""
