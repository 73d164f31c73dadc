"""Operations the model layers call, each on the backend the device and build support."""
