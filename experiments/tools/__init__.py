"""Project tooling that is not part of the library: the GPU check, the fault trial, ahead-of-time kernel builds."""
