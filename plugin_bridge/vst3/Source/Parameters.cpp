#include "Parameters.h"

namespace unbake
{
juce::String gainId (int stem) { return juce::String (kStemNames[(size_t) stem]) + "_gain_db"; }
juce::String muteId (int stem) { return juce::String (kStemNames[(size_t) stem]) + "_mute"; }

int stemIndex (const std::string& name)
{
    for (size_t i = 0; i < kStemNames.size(); ++i)
        if (name == kStemNames[i])
            return (int) i;
    return -1;
}

juce::AudioProcessorValueTreeState::ParameterLayout createParameterLayout()
{
    juce::AudioProcessorValueTreeState::ParameterLayout layout;
    layout.add (std::make_unique<juce::AudioParameterChoice> (juce::ParameterID { kModelId, 1 }, kModelId,
                                                              modelChoices(), 0));
    for (int s = 0; s < (int) kStemNames.size(); ++s)
    {
        // no label (see Parameters.h); text "-6.00" so pedalboard reads the value back as a number
        auto gainAttributes = juce::AudioParameterFloatAttributes()
                                  .withStringFromValueFunction ([] (float v, int) { return juce::String (v, 2); })
                                  .withValueFromStringFunction ([] (const juce::String& t) { return t.getFloatValue(); });
        layout.add (std::make_unique<juce::AudioParameterFloat> (
            juce::ParameterID { gainId (s), 1 }, gainId (s),
            juce::NormalisableRange<float> (kMinGainDb, kMaxGainDb, 0.01f), 0.0f, gainAttributes));
        layout.add (std::make_unique<juce::AudioParameterBool> (juce::ParameterID { muteId (s), 1 }, muteId (s), false));
    }
    return layout;
}
} // namespace unbake
