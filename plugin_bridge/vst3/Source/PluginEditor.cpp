#include "PluginEditor.h"
#include "EngineClient.h"
#include "PluginProcessor.h"

#include <algorithm>

namespace unbake
{
namespace
{
namespace palette
{
const juce::Colour background { 0xff1c2126 }, panel { 0xff272e35 }, outline { 0xff38424b }, text { 0xffe8ecef },
    caption { 0xff97a3ad }, good { 0xff5cc982 }, bad { 0xffe86f5e }, accent { 0xff4fa3e0 };
}

constexpr int kMargin = 10, kPad = 8, kHeadingH = 22, kRowH = 34, kInfoH = 21, kFieldH = 26;
constexpr float kDimAlpha = 0.35f;

double latencyMs (const EngineStatus& st) { return st.sampleRate > 0 ? 1000.0 * st.latencySamples / st.sampleRate : 0.0; }

juce::String joined (const std::vector<std::string>& v)
{
    juce::StringArray a;
    for (const auto& s : v)
        a.add (s);
    return a.joinIntoString (", ");
}

void styleHeading (juce::Label& l, const juce::String& text)
{
    l.setText (text, juce::dontSendNotification);
    l.setFont (juce::Font (15.0f, juce::Font::bold));
    l.setColour (juce::Label::textColourId, palette::text);
}

void styleCaption (juce::Label& l, const juce::String& text)
{
    l.setText (text, juce::dontSendNotification);
    l.setFont (juce::Font (13.5f));
    l.setColour (juce::Label::textColourId, palette::caption);
}
} // namespace

static juce::LookAndFeel_V4::ColourScheme colourScheme()
{
    using namespace palette;
    return { background, background.darker (0.3f), panel, outline, text, accent, juce::Colours::white, accent, text };
}

UnbakeEditor::UnbakeEditor (UnbakeProcessor& p) : AudioProcessorEditor (p), processor (p), lookAndFeel (colourScheme())
{
    setLookAndFeel (&lookAndFeel);

    title.setText ("unbake", juce::dontSendNotification);
    title.setFont (juce::Font (24.0f, juce::Font::bold));
    title.setColour (juce::Label::textColourId, palette::text);
    addAndMakeVisible (title);

    styleCaption (modelLabel, "Model");
    modelLabel.setJustificationType (juce::Justification::centredRight);
    addAndMakeVisible (modelLabel);
    model.addItemList (modelChoices(), 1); // item id = choice index + 1, as ComboBoxAttachment expects
    model.setTooltip ("the separation model the engine runs (a new session when it changes)");
    model.setComponentID ("model");
    addAndMakeVisible (model);
    modelAttachment = std::make_unique<ComboBoxAttachment> (p.parameters(), kModelId, model);

    styleHeading (stemsHeading, "Stems");
    addAndMakeVisible (stemsHeading);
    for (int s = 0; s < (int) stems.size(); ++s)
    {
        auto& row = stems[(size_t) s];
        row.name.setText (kStemNames[(size_t) s], juce::dontSendNotification);
        row.name.setFont (juce::Font (14.5f));
        row.name.setColour (juce::Label::textColourId, palette::text);
        row.name.setMinimumHorizontalScale (0.75f);
        addAndMakeVisible (row.name);

        row.gain.setColour (juce::Slider::trackColourId, palette::accent);
        row.gain.setColour (juce::Slider::textBoxOutlineColourId, palette::outline);
        row.gain.setTextBoxStyle (juce::Slider::TextBoxRight, false, 64, 22);
        addAndMakeVisible (row.gain);
        row.gainAttachment = std::make_unique<SliderAttachment> (p.parameters(), gainId (s), row.gain);
        // after the attachment (which installs the parameter's own text functions): "-6.0 dB"
        row.gain.textFromValueFunction = [] (double v) { return juce::String (v, 1) + " dB"; };
        row.gain.valueFromTextFunction = [] (const juce::String& t) { return t.upToFirstOccurrenceOf ("dB", false, true).trim().getDoubleValue(); };
        row.gain.setDoubleClickReturnValue (true, 0.0);
        row.gain.updateText();

        row.mute.setColour (juce::ToggleButton::tickColourId, palette::bad);
        row.mute.setColour (juce::ToggleButton::textColourId, palette::text);
        addAndMakeVisible (row.mute);
        row.muteAttachment = std::make_unique<ButtonAttachment> (p.parameters(), muteId (s), row.mute);
    }

    styleHeading (engineHeading, "Engine");
    addAndMakeVisible (engineHeading);
    connection.setFont (juce::Font (14.5f, juce::Font::bold));
    addAndMakeVisible (connection);
    statusLine.setFont (juce::Font (13.0f));
    statusLine.setColour (juce::Label::textColourId, palette::text);
    statusLine.setJustificationType (juce::Justification::topLeft);
    statusLine.setMinimumHorizontalScale (0.85f);
    addAndMakeVisible (statusLine);

    static const char* captions[numInfo] { "Endpoint", "Model", "Device", "Stems", "Latency", "", "Sample rate", "Late frames" };
    for (int i = 0; i < numInfo; ++i)
    {
        styleCaption (infoCaption[(size_t) i], captions[i]);
        addAndMakeVisible (infoCaption[(size_t) i]);
        auto& v = infoValue[(size_t) i];
        v.setFont (juce::Font (13.5f));
        v.setColour (juce::Label::textColourId, palette::text);
        v.setMinimumHorizontalScale (0.6f);
        addAndMakeVisible (v);
    }
    infoCaption[lateInfo].setTooltip ("stem frames replaced by silence because they came too late (real time)");

    auto styleField = [this] (juce::Label& label, const juce::String& caption, juce::TextEditor& field,
                              const juce::String& whenEmpty, const juce::String& tip) {
        styleCaption (label, caption);
        addAndMakeVisible (label);
        field.setFont (juce::Font (13.5f));
        field.setTextToShowWhenEmpty (whenEmpty, palette::caption);
        field.setColour (juce::TextEditor::backgroundColourId, palette::background);
        field.setColour (juce::TextEditor::outlineColourId, palette::outline);
        field.setColour (juce::TextEditor::textColourId, palette::text);
        field.setSelectAllWhenFocused (true);
        field.setTooltip (tip);
        field.setIndents (6, 5);
        addAndMakeVisible (field);
    };
    styleField (endpointLabel, "Endpoint", endpointField, juce::String (defaultEndpoint()) + "  (default)",
                "where the plugin looks for the engine (empty: $UNBAKE_ENDPOINT, else the per-user socket); "
                "Return applies it");
    styleField (commandLabel, "Engine command", commandField, "none: start the engine yourself (unbake serve)",
                "the command that starts an engine when none answers at the endpoint; Return applies it");
    endpointField.setComponentID ("endpoint");
    commandField.setComponentID ("engine_command");
    endpointField.setText (p.endpointSetting(), false);
    commandField.setText (p.engineCommandSetting(), false);
    endpointField.setCaretPosition (0);
    commandField.setCaretPosition (0);
    endpointField.onReturnKey = [this] { commitEndpoint(); };
    endpointField.onFocusLost = [this] { commitEndpoint(); };
    endpointField.onEscapeKey = [this] { endpointField.setText (processor.endpointSetting(), false); };
    commandField.onReturnKey = [this] { commitEngineCommand(); };
    commandField.onFocusLost = [this] { commitEngineCommand(); };
    commandField.onEscapeKey = [this] { commandField.setText (processor.engineCommandSetting(), false); };

    setSize (kWidth, kHeight);
    setResizable (false, false);
    refresh();
    startTimerHz (kRefreshHz);
}

UnbakeEditor::~UnbakeEditor()
{
    stopTimer();
    // what is being typed is applied (as when the field loses the focus); a field not being edited
    // may lag a host's change of the state by a timer tick, so it is not written back; then no
    // callback may run while the members go
    if (endpointField.hasKeyboardFocus (true))
        commitEndpoint();
    if (commandField.hasKeyboardFocus (true))
        commitEngineCommand();
    for (auto* field : { &endpointField, &commandField })
        field->onReturnKey = field->onFocusLost = field->onEscapeKey = nullptr;
    setLookAndFeel (nullptr);
}

void UnbakeEditor::commitEndpoint()
{
    const auto text = endpointField.getText().trim();
    if (text != processor.endpointSetting())
        processor.setEndpoint (text);
}

void UnbakeEditor::commitEngineCommand()
{
    const auto text = commandField.getText().trim();
    if (text != processor.engineCommandSetting())
        processor.setEngineCommand (text);
}

bool UnbakeEditor::stemDimmed (int s) const
{
    // "accompaniment" always acts: a model's own stem, or a factor on every stem but vocals
    if (! shown.connected || s == kAccompaniment)
        return false;
    return std::find (shown.stems.begin(), shown.stems.end(), kStemNames[(size_t) s]) == shown.stems.end();
}

juce::String UnbakeEditor::stemTooltip (int s) const { return stems[(size_t) s].tooltip; }

juce::Rectangle<int> UnbakeEditor::stemRowBounds (int s) const
{
    const auto& row = stems[(size_t) s];
    return row.name.getBounds().getUnion (row.gain.getBounds()).getUnion (row.mute.getBounds());
}

void UnbakeEditor::refresh()
{
    shown = processor.engineStatus();
    const auto& st = shown;
    const juce::String modelName (st.model);

    connection.setText (st.connected ? juce::String (juce::CharPointer_UTF8 ("\xe2\x97\x8f connected"))
                                     : juce::String (juce::CharPointer_UTF8 ("\xe2\x97\x8f not connected")),
                        juce::dontSendNotification);
    connection.setColour (juce::Label::textColourId, st.connected ? palette::good : palette::bad);
    const auto summary = st.connected ? modelName + " on " + juce::String (st.device) + ", latency "
                                            + juce::String (st.latencySamples) + " samples ("
                                            + juce::String (latencyMs (st), 0)
                                            + " ms)"
                                      : juce::String (st.line);
    statusLine.setText (summary, juce::dontSendNotification);
    statusLine.setTooltip (st.line);

    auto show = [this] (Info i, const juce::String& v) { // "" shows "-", " " a blank row
        infoValue[i].setText (v.isNotEmpty() ? v : juce::String ("-"), juce::dontSendNotification);
        infoValue[i].setTooltip (v);
    };
    show (endpointInfo, st.endpoint);
    show (modelInfo, modelName);
    show (deviceInfo, st.device);
    show (stemsInfo, joined (st.stems));
    show (latencyInfo, st.connected ? juce::String (st.latencySamples) + " samples" : juce::String());
    show (latencyMsInfo, st.connected && st.sampleRate > 0 ? juce::String (latencyMs (st), 1) + " ms" : juce::String (" "));
    show (rateInfo, st.sampleRate > 0 ? juce::String (st.sampleRate, 0) + " Hz" : juce::String());
    show (lateInfo, juce::String (st.lateFrames));

    for (int s = 0; s < (int) stems.size(); ++s)
    {
        auto& row = stems[(size_t) s];
        const bool dim = stemDimmed (s);
        juce::String tip;
        if (dim)
            tip = "not in " + modelName;
        else if (s == kAccompaniment && st.connected
                 && std::find (st.stems.begin(), st.stems.end(), kStemNames[(size_t) s]) == st.stems.end())
            tip = "everything but vocals (" + modelName + " has no accompaniment stem)";
        for (juce::Component* c : { (juce::Component*) &row.name, (juce::Component*) &row.gain, (juce::Component*) &row.mute })
            c->setAlpha (dim ? kDimAlpha : 1.0f);
        row.tooltip = tip;
        row.name.setTooltip (tip);
        row.gain.setTooltip (tip);
        row.mute.setTooltip (tip);
    }

    // the host may change the state (a preset, an undo): show it, unless the field is being edited
    auto sync = [] (juce::TextEditor& field, const juce::String& setting) {
        if (! field.hasKeyboardFocus (true) && field.getText() != setting)
        {
            field.setText (setting, false);
            field.setCaretPosition (0); // a long endpoint shows its start
        }
    };
    sync (endpointField, processor.endpointSetting());
    sync (commandField, processor.engineCommandSetting());
}

void UnbakeEditor::paint (juce::Graphics& g)
{
    g.fillAll (palette::background);
    for (auto r : { stemsPanel, enginePanel, settingsPanel })
    {
        g.setColour (palette::panel);
        g.fillRoundedRectangle (r.toFloat(), 6.0f);
        g.setColour (palette::outline);
        g.drawRoundedRectangle (r.toFloat().reduced (0.5f), 6.0f, 1.0f);
    }
    g.setColour (palette::caption);
    g.setFont (juce::Font (12.5f));
    g.drawText ("stem separation by the unbake engine", title.getBounds().withX (title.getX() + 96).withWidth (240),
                juce::Justification::centredLeft);
}

void UnbakeEditor::resized()
{
    auto area = getLocalBounds().reduced (kMargin);

    auto header = area.removeFromTop (34);
    title.setBounds (header.removeFromLeft (96));
    model.setBounds (header.removeFromRight (190).reduced (0, 3));
    modelLabel.setBounds (header.removeFromRight (60));
    area.removeFromTop (6);

    settingsPanel = area.removeFromBottom (2 * kFieldH + 3 * kPad - 2);
    area.removeFromBottom (kPad);
    {
        auto r = settingsPanel.reduced (kPad);
        auto line = [&r] (juce::Label& label, juce::TextEditor& field) {
            auto row = r.removeFromTop (kFieldH);
            label.setBounds (row.removeFromLeft (112));
            field.setBounds (row);
            r.removeFromTop (kPad - 2);
        };
        line (endpointLabel, endpointField);
        line (commandLabel, commandField);
    }

    stemsPanel = area.removeFromLeft (316);
    area.removeFromLeft (kPad);
    enginePanel = area;
    {
        auto r = stemsPanel.reduced (kPad, 4);
        stemsHeading.setBounds (r.removeFromTop (kHeadingH));
        for (auto& row : stems)
        {
            auto line = r.removeFromTop (kRowH).reduced (0, 3);
            row.name.setBounds (line.removeFromLeft (102));
            row.mute.setBounds (line.removeFromRight (58));
            row.gain.setBounds (line.withTrimmedRight (4));
        }
    }
    {
        auto r = enginePanel.reduced (kPad, 4);
        engineHeading.setBounds (r.removeFromTop (kHeadingH));
        connection.setBounds (r.removeFromTop (20));
        statusLine.setBounds (r.removeFromTop (50)); // 3 lines (the whole line: its tooltip)
        r.removeFromTop (2);
        for (int i = 0; i < numInfo; ++i)
        {
            auto line = r.removeFromTop (kInfoH);
            infoCaption[(size_t) i].setBounds (line.removeFromLeft (74));
            infoValue[(size_t) i].setBounds (line);
        }
    }
}

juce::AudioProcessorEditor* createUnbakeEditor (UnbakeProcessor& processor)
{
    return new UnbakeEditor (processor);
}
} // namespace unbake
